"""A researcher's own rule, from a file or an installed package, gets what built-in rules get."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from creditaudit.errors import ConfigError
from creditaudit.rules import RULES, build_rule, plugins
from creditaudit.training.trainer import train
from tests.conftest import tiny_config

MY_RULE = '''
"""signdfa: DFA with sign-only feedback (a test plugin)."""
import torch
from torch.nn import functional as F

from creditaudit.rules import RULES, Rule


@RULES.register("{name}", "DFA with sign feedback (plugin)")
class SignDFA(Rule):
    def setup(self, model, ctx):
        with torch.no_grad():
            hs = model.run(torch.zeros(1, *self.input_shape(model))).hs
        self.B = [torch.randn(ctx.num_classes, h[0].numel()).sign().to(ctx.device) for h in hs]

    @staticmethod
    def input_shape(model):
        first = next(m for m in model.embed.modules() if isinstance(m, torch.nn.Linear))
        return (first.in_features,)

    def credits(self, model, x, y, fwd):
        e = F.softmax(fwd.logits.detach(), 1) - F.one_hot(y, fwd.logits.shape[1]).to(fwd.logits.dtype)
        return [(e @ B).view_as(h) * 1e-2 for B, h in zip(self.B, fwd.hs)]

    def state_dict(self):
        return {{"B": self.B}}

    def load_state_dict(self, state):
        self.B = list(state["B"])
'''


@pytest.fixture(autouse=True)
def _isolated_registry(monkeypatch):
    monkeypatch.setattr(RULES, "_entries", dict(RULES._entries))
    monkeypatch.setattr(plugins, "_loaded_files", {})


def test_rule_from_a_file_trains_like_a_builtin(tmp_path):
    path = tmp_path / "my_rule.py"
    path.write_text(MY_RULE.format(name="signdfa"))
    cfg = tiny_config(tmp_path, f"rule={path}", "epochs=2")
    assert cfg.rule == "signdfa" and cfg.plugins == (str(path.resolve()),)
    summary = train(cfg)
    run = tmp_path / "results" / "adhoc" / "signdfa__resmlp__s42"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert "credit/deep_cos" in records[-1]  # a plugin rule gets the diagnostics too
    assert summary["status"] == "finished" and losses[1] < losses[0]
    assert json.loads((run / "config.json").read_text())["plugins"] == [str(path.resolve())]
    # Resuming or re-reading needs nothing but the stored config: plugins are imported from it.
    assert train(cfg)["status"] == "finished"


def test_plugins_field_then_rule_name(tmp_path):
    path = tmp_path / "my_rule.py"
    path.write_text(MY_RULE.format(name="signdfa2"))
    cfg = tiny_config(tmp_path, f"plugins={path}", "rule=signdfa2_frozen")
    rule, variant = build_rule(cfg.rule)
    assert type(rule).__name__ == "SignDFA" and variant == "frozen"


@pytest.mark.parametrize(
    "content, message",
    [
        ("raise RuntimeError('boom')", "importing rule file .* failed: RuntimeError: boom"),
        ("x = 1", "registered no rule"),
    ],
)
def test_broken_rule_files_get_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad_rule.py"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, f"rule={path}")


def test_missing_rule_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        tiny_config(tmp_path, f"rule={tmp_path / 'nope.py'}")


def test_rule_from_an_installed_package_entry_point(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "my_rules_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(MY_RULE.format(name="eprule"))
    dist = tmp_path / "site" / "my_rules_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-rules-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[creditaudit.rules]\neprule = my_rules_pkg\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "my_rules_pkg", raising=False)
    plugins.load_entry_point_rules()
    assert "eprule" in RULES
    assert train(tiny_config(tmp_path, "rule=eprule", "epochs=1"))["status"] == "finished"


def test_a_broken_entry_point_warns_and_is_skipped(tmp_path, monkeypatch):
    site = tmp_path / "site"
    dist = site / "broken-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent("[creditaudit.rules]\nbroken = no_such_module_xyz\n")
    )
    monkeypatch.syspath_prepend(str(site))
    with pytest.warns(RuntimeWarning, match="rule plugin 'broken'"):
        plugins.load_entry_point_rules()


TOY_ARCH = """
from torch import nn

from creditaudit.models.base import Block, CreditNet, ModelConfig, arch_shape, architecture, flat_dim


@architecture("toy_res", "a toy residual MLP from a plugin file", d=12, L=2, out_ln=True, residual=True,
              small={"d": 8, "L": 1})
def toy_res(cfg: ModelConfig, input_shape: tuple, num_classes: int) -> CreditNet:
    shape = arch_shape("toy_res", cfg)
    embed = nn.Sequential(nn.Flatten(), nn.Linear(flat_dim(input_shape), shape.d))
    blocks = [Block(nn.Sequential(nn.LayerNorm(shape.d), nn.Linear(shape.d, shape.d)), residual=shape.residual)
              for _ in range(shape.L)]
    norm = nn.LayerNorm(shape.d) if shape.out_ln else nn.Identity()
    return CreditNet(embed, blocks, norm, nn.Linear(shape.d, num_classes))
"""


def test_an_architecture_is_one_file(tmp_path):
    """A new architecture registers from one file, with its own defaults, and trains with any rule."""
    import json

    from creditaudit.config import run_path
    from creditaudit.models import ModelConfig
    from creditaudit.models.base import arch_shape
    from creditaudit.training.trainer import train

    path = tmp_path / "toy_arch.py"
    path.write_text(TOY_ARCH)
    for rule in ("bp", "dfa"):
        cfg = tiny_config(tmp_path, f"plugins={path}", "arch=toy_res", f"rule={rule}", "epochs=1")
        summary = train(cfg)
        assert summary["status"] == "finished"
        stored = json.loads((run_path(cfg) / "config.json").read_text())
        assert stored["plugins"] == [str(path)] and stored["model"]["out_ln"] is True
    assert arch_shape("toy_res", ModelConfig()) == arch_shape(
        "toy_res", ModelConfig(d=12, L=2, out_ln=True, residual=True)
    )


def test_the_registry_gives_a_rule_its_name_once():
    """A rule's name is written once, in its registration: the class gets it (``Rule.name``), a class
    registered under two names, or a non-rule, is refused."""
    from creditaudit.rules.base import Rule, RuleRegistry

    registry = RuleRegistry("rule")

    @registry.register("mine", "a test rule")
    class Mine(Rule):
        pass

    assert Mine.name == "mine" and Rule.name == ""
    with pytest.raises(ValueError, match="one class, one name"):
        registry.add("other", Mine)
    with pytest.raises(TypeError, match=r"subclass of creditaudit.rules.Rule"):
        registry.add("fn", lambda: None)
    assert all(RULES.get(n).name == n for n in RULES.names())


def test_an_options_class_names_its_option_and_the_registry_names_the_rule():
    from dataclasses import dataclass, field

    from creditaudit.rules.base import rule_options
    from creditaudit.rules.options import OptionError, check_positive

    @dataclass
    class Opts:
        scale: float = field(default=1.0, metadata={"help": "a scale"})

        def __post_init__(self) -> None:
            check_positive("scale", self.scale)

    with pytest.raises(OptionError, match=r"^scale=-1: expected a finite number > 0$"):
        Opts(scale=-1)
    with pytest.raises(ConfigError, match=r"^ep\.beta=0\.0: expected a finite number > 0$"):
        rule_options("ep_frozen", {"beta": "0"})
