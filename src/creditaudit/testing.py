"""The conformance kit for a credit-assignment rule: check your own rule the way creditaudit checks
its built-in ones (in the spirit of scikit-learn's ``check_estimator``).

    from creditaudit.testing import check_rule
    check_rule("path/to/my_rule.py")        # or a registered name, or the Rule subclass itself

or, on the command line, ``creditaudit check-rule path/to/my_rule.py``. Every check trains a
seconds-long run on scikit-learn's bundled digits (offline, one thread) in a temporary folder, on
small instances of the architectures (``archs``), and says what to fix when it fails:

- ``options``: the rule's ``Options`` is a dataclass whose every field has a type and a help text,
  the defaults validate, and a run config of the rule validates;
- ``step`` (per architecture, and per variant ``_frozen`` / ``_shallow``): one training step gives a
  finite loss and finite metrics; embedding, blocks and head move, and a ``_frozen`` variant's blocks
  do not; no layer is left patched after the step; the credits a_0..a_L are one per state, of its
  shape and dtype, finite and detached;
- ``same seed``: two runs of one config log the same metrics, bit for bit;
- ``resume``: a run stopped after one epoch and resumed from its checkpoint logs what an
  uninterrupted run logs, bit for bit (the rule's ``state_dict`` holds everything it needs);
- ``stack``: a rule that declares ``stack_refusal = None`` takes, in a stack of two runs, the step
  each run takes alone (parameters within 2·lr, Adam's sign step; buffers to 1e-5); a rule that
  declares a reason runs alone, and the check says so.

:func:`check_rule` runs them all and raises :class:`RuleCheckError` listing every failure (or, with
``raise_on_failure=False``, returns the :class:`Check` results). The single checks
(:func:`check_options`, :func:`check_step`, :func:`check_same_seed`, :func:`check_resume`,
:func:`check_stack`) raise :class:`RuleCheckError` on failure: creditaudit's own test suite calls
them for every built-in rule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from creditaudit.errors import UserError

#: The architectures a rule is checked on by default: a residual MLP, a conv net with BatchNorm
#: (samples interact) whose states change shape, and a transformer whose states are token grids.
DEFAULT_ARCHS = ("resmlp", "smallcnn", "vit_mini")
VARIANT_SUFFIXES = ("", "_frozen", "_shallow")


class RuleCheckError(AssertionError):
    """A rule broke the contract; the message says which property and what to fix."""


@dataclass(frozen=True)
class Check:
    """One property checked: its name, whether it holds, and what was seen (or what to fix)."""

    name: str
    passed: bool
    detail: str = ""

    def __str__(self) -> str:
        return f"{'ok  ' if self.passed else 'FAIL'} {self.name}" + (
            f": {self.detail}" if self.detail else ""
        )


def resolve_rule(rule: str | type | Path) -> str:
    """The registry name of ``rule``: a registered name, a registered ``Rule`` subclass, or the path
    of a Python file that registers exactly one rule (imported here)."""
    from creditaudit.rules import RULES, Rule, load_rule_file

    if isinstance(rule, type):
        if not issubclass(rule, Rule):
            raise UserError(f"{rule.__name__} is not a subclass of creditaudit.rules.Rule")
        if not rule.name or RULES.get(rule.name) is not rule:
            raise UserError(
                f'{rule.__name__} is not registered: decorate it with @RULES.register("name", "one line")'
            )
        return rule.name
    text = str(rule)
    if text.endswith(".py") or Path(text).is_file():
        names = load_rule_file(text)
        if len(names) != 1:
            raise UserError(
                f"{text} registers {len(names)} rules ({', '.join(names) or 'none'}): check one by name "
                "after importing the file (creditaudit check-rule FILE --rule NAME)"
            )
        return names[0]
    RULES.get(text)  # an unknown name: one line listing the known ones
    return text


# ---------------------------------------------------------------------------------------------
# Runs the checks train
# ---------------------------------------------------------------------------------------------
def tiny_config(root: str | Path, rule: str, arch: str = "resmlp", *overrides: str):
    """A seconds-long run of ``rule`` on the bundled digits (1×8×8, 1,437 / 360), the small instance
    of ``arch``, two epochs of batch 64, one thread, in ``root``."""
    from creditaudit.config import TrainConfig, apply_overrides

    base = [
        "dataset=digits",
        f"arch={arch}",
        *small_overrides(arch, shallow=rule.endswith("_shallow")),
        "epochs=2",
        "batch_size=64",
        "threads=1",
        "progress=false",
        f"results={Path(root) / 'results'}",
        f"data_dir={Path(root) / 'data'}",
        f"rule={rule}",
    ]
    return apply_overrides(TrainConfig(), [*base, *overrides])


def small_overrides(arch: str, *, shallow: bool = False) -> list[str]:
    """``key=value`` items for the small instance of ``arch`` its registration declares (without L
    for a ``_shallow`` variant, which has none)."""
    from creditaudit.models import ARCHS

    return [
        f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
        for k, v in ARCHS.get(arch).small.items()
        if not (shallow and k == "L")
    ]


@contextlib.contextmanager
def _one_thread_seeded() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def run_metrics(cfg) -> list[dict]:
    """A run's metrics.jsonl records without the wall-clock timings (everything else is a
    deterministic function of the config)."""
    from creditaudit.config import run_path
    from creditaudit.runs.folder import RunFolder

    return [
        {k: v for k, v in r.items() if not k.startswith("time/")}
        for r in RunFolder(run_path(cfg)).read_metrics()
    ]


def _first_difference(a: list[dict], b: list[dict]) -> str:
    if len(a) != len(b):
        return f"{len(a)} records against {len(b)}"
    for ra, rb in zip(a, b, strict=True):
        for k in sorted(set(ra) | set(rb)):
            va, vb = ra.get(k), rb.get(k)
            if va != vb and not (
                isinstance(va, float)
                and isinstance(vb, float)
                and math.isnan(va)
                and math.isnan(vb)
            ):
                return f"epoch {ra.get('epoch')}: {k} = {va!r} against {vb!r}"
    return ""


def _fail(what: str, fix: str) -> None:
    raise RuleCheckError(f"{what} — {fix}")


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------
def check_options(rule: str) -> None:
    """Options: a dataclass, every field typed and with a help text; the defaults validate, and so
    does a run config of the rule."""
    from creditaudit.rules import RULES, rule_options

    opts = RULES.get(rule).Options
    if not dataclasses.is_dataclass(opts):
        _fail(
            f"{rule}.Options is {opts!r}, not a dataclass",
            "declare the options as a @dataclass (or leave Options unset)",
        )
    hints = typing.get_type_hints(opts)
    for f in dataclasses.fields(opts):
        if f.name not in hints:
            _fail(
                f"option {rule}.{f.name} has no type",
                "annotate it (the command line parses values by type)",
            )
        if not f.metadata.get("help"):
            _fail(
                f"option {rule}.{f.name} has no help text",
                'give it field(default=..., metadata={"help": "what it sets"}) (`creditaudit list --options` shows it)',
            )
    try:
        rule_options(rule, {})
    except Exception as e:
        _fail(
            f"{rule}'s default options do not validate ({type(e).__name__}: {e})",
            "make every default satisfy the checks of __post_init__",
        )
    with tempfile.TemporaryDirectory() as tmp:
        try:
            tiny_config(tmp, rule)
        except Exception as e:
            _fail(
                f"a run config of {rule} does not validate ({type(e).__name__}: {e})",
                "see the message",
            )


def check_step(rule: str, arch: str = "resmlp", variant: str = "") -> None:
    """One training step through the trainer's own path (see the module docstring)."""
    from creditaudit.training.run import build_run, train_step

    name = rule + variant
    where = f"{name} on {arch}"
    with tempfile.TemporaryDirectory() as tmp, _one_thread_seeded():
        run = build_run(tiny_config(tmp, name, arch, "batch_size=16"))
        x, y = next(iter(run.loader.epoch(0)))
        if not run.rule.end_to_end:
            _check_credits(run, x, y, where)
        before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
        try:
            loss, _, metrics = train_step(run, x, y)
        except Exception as e:
            _fail(f"{where}: the training step raised {type(e).__name__}: {e}", "see the message")
        if not math.isfinite(float(loss)):
            _fail(
                f"{where}: the step's loss is {float(loss)}",
                "the credits or the update diverge on a fresh model",
            )
        bad = {k: float(v) for k, v in metrics.items() if not math.isfinite(float(v))}
        if bad:
            _fail(f"{where}: metrics not finite: {bad}", "what the rule reports must be finite")
        moved = {
            n for n, p in run.model.named_parameters() if not torch.equal(p.detach(), before[n])
        }
        blocks = {n for n in before if n.startswith("blocks.")}
        for part in ("embed.", "head."):
            if not any(n.startswith(part) for n in moved):
                _fail(
                    f"{where}: no {part[:-1]} parameter moved",
                    "the embedding learns from a_0 and the head from CE: return a non-zero a_0 of h_0's shape"
                    if part == "embed."
                    else "leave the head to the trainer (it learns from CE)",
                )
        if variant == "_frozen" and moved & blocks:
            _fail(
                f"{where}: frozen blocks moved ({', '.join(sorted(moved & blocks)[:3])})",
                "a rule must not update parameters itself: return credits, and let the trainer update",
            )
        if variant != "_frozen" and not blocks <= moved:
            _fail(
                f"{where}: block parameters did not move ({', '.join(sorted(blocks - moved)[:3])})",
                "return a non-zero credit a_l for every state h_1..h_L",
            )
        if (run.model.L == 0) != (variant == "_shallow"):
            _fail(
                f"{where}: the model has L={run.model.L}",
                "the rule must not change the model's depth",
            )
        if any("forward" in m.__dict__ for m in run.model.modules()):
            _fail(
                f"{where}: a layer is still patched after the step",
                "restore every patched forward when local_forward()'s context exits (use try/finally)",
            )


def _check_credits(run, x, y, where: str) -> None:
    """One credit per state, of its shape and dtype, finite, detached."""
    with run.rule.local_forward(run.model):
        fwd = run.model.run(x, detach_inputs=True)
        credits = run.rule.credits(run.model, x, y, fwd)
    run.rule.reported()
    if len(credits) != len(fwd.hs):
        _fail(
            f"{where}: {len(credits)} credits for {len(fwd.hs)} states",
            "return one credit per state h_0..h_L",
        )
    for l, (a, h) in enumerate(zip(credits, fwd.hs, strict=True)):
        if a.shape != h.shape or a.dtype != h.dtype:
            _fail(
                f"{where}: a_{l} is {tuple(a.shape)} {a.dtype}, h_{l} is {tuple(h.shape)} {h.dtype}",
                "give a_l the shape and dtype of h_l (view/reshape a flat credit back)",
            )
        if not torch.isfinite(a).all():
            _fail(f"{where}: a_{l} is not finite", "the credits diverge on a fresh model")
        if a.requires_grad:
            _fail(f"{where}: a_{l} requires grad", "return detached credits (.detach())")


def check_same_seed(rule: str, arch: str = "resmlp") -> None:
    """Two runs of one config log the same metrics, bit for bit."""
    from creditaudit.training.trainer import train

    with tempfile.TemporaryDirectory() as tmp, _one_thread_seeded():
        cfgs = [tiny_config(Path(tmp) / side, rule, arch, "epochs=1") for side in ("a", "b")]
        for cfg in cfgs:
            train(cfg)
        diff = _first_difference(*(run_metrics(c) for c in cfgs))
    if diff:
        _fail(
            f"{rule} on {arch}: two runs of one seed differ ({diff})",
            "draw every random number in setup() from torch's global RNG (seeded from the run seed) or from a "
            "generator seeded from it, never from an unseeded source",
        )


def check_resume(rule: str, arch: str = "resmlp") -> None:
    """A run stopped after one epoch and resumed logs what an uninterrupted run logs."""
    from creditaudit.training.trainer import train

    with tempfile.TemporaryDirectory() as tmp, _one_thread_seeded():
        full, cut = (
            tiny_config(Path(tmp) / "full", rule, arch),
            tiny_config(Path(tmp) / "cut", rule, arch),
        )
        train(full)
        train(cut, stop_after=1)
        resumed = train(cut).get("resumed_from")
        diff = _first_difference(run_metrics(full), run_metrics(cut))
    if resumed != 1:
        _fail(
            f"{rule} on {arch}: the run did not resume from its checkpoint (resumed_from={resumed})",
            "see the run's log",
        )
    if diff:
        _fail(
            f"{rule} on {arch}: a resumed run differs from an uninterrupted one ({diff})",
            "return everything the rule keeps between steps (matrices, estimators, their optimizers, generators, "
            "step counters) from state_dict() and restore it in load_state_dict()",
        )


def check_stack(rule: str, arch: str = "resmlp") -> str:
    """A stackable rule's stacked step is each run's own step; returns what was seen."""
    from creditaudit.config import resolve_rule_options
    from creditaudit.data.loader import stacked_epoch
    from creditaudit.rules import RULES
    from creditaudit.training.run import build_run, train_step
    from creditaudit.training.stack import Stack

    refusal = RULES.get(rule).stack_refusal
    if refusal is not None:
        return f"runs alone ({refusal})"
    with tempfile.TemporaryDirectory() as tmp, _one_thread_seeded():
        cfgs = [
            resolve_rule_options(tiny_config(tmp, rule, arch, f"seed={s}", "lam=0.01"))
            for s in (1, 2)
        ]
        alone, stacked = [build_run(c) for c in cfgs], [build_run(c) for c in cfgs]
        try:
            stack = Stack(stacked)
            x, y = next(iter(stacked_epoch([r.loader for r in stacked], 0)))
            stack.train_step(x, y)
            stack.unstack()
        except Exception as e:
            _fail(
                f"{rule} on {arch}: a stack of two runs fails ({type(e).__name__}: {e})",
                "make credits() a function of the model, the batch and tensors set in "
                "setup() (returned by state_dict()), "
                "with torch.func derivatives and no random draw — or set stack_refusal to the reason it cannot",
            )
        lr = cfgs[0].optim.lr
        for r, run in enumerate(alone):
            train_step(run, x[r], y[r])
            for (n, t), u in zip(
                run.model.named_parameters(), stacked[r].model.parameters(), strict=True
            ):
                if not torch.allclose(u, t, rtol=0, atol=2.1 * lr):
                    _fail(
                        f"{rule} on {arch}: in a stack, run {r}'s {n} moves otherwise than alone "
                        f"(by up to {float((u - t).abs().max()):.3g})",
                        "something in credits() mixes the runs of a stack or depends on "
                        "state that is not in state_dict(); "
                        "or set stack_refusal to the reason it cannot stack",
                    )
            for (n, tb), ub in zip(
                run.model.named_buffers(), stacked[r].model.buffers(), strict=True
            ):
                if tb.is_floating_point() and not torch.allclose(ub, tb, rtol=1e-5, atol=1e-7):
                    _fail(
                        f"{rule} on {arch}: in a stack, run {r}'s buffer {n} differs from alone",
                        "see above",
                    )
    return "a stacked step is each run's own step"


def check_rule(
    rule: str | type | Path,
    *,
    archs: tuple[str, ...] = DEFAULT_ARCHS,
    variants: bool = True,
    raise_on_failure: bool = True,
) -> list[Check]:
    """Every check of the module docstring for ``rule`` (a registered name, a registered ``Rule``
    subclass or a rule file). Returns the results; raises :class:`RuleCheckError` listing every
    failure unless ``raise_on_failure`` is False. Takes seconds to a minute per architecture."""
    name = resolve_rule(rule)
    results: list[Check] = []

    def run(label: str, fn, *args) -> None:
        try:
            seen = fn(*args)
            results.append(Check(label, True, seen if isinstance(seen, str) else ""))
        except RuleCheckError as e:
            results.append(Check(label, False, str(e)))
        except Exception as e:  # the rule raised: say where
            results.append(Check(label, False, f"{type(e).__name__}: {e}"))

    run("options", check_options, name)
    for arch in archs:
        for variant in VARIANT_SUFFIXES if variants else ("",):
            run(f"step {name}{variant} on {arch}", check_step, name, arch, variant)
    run("same seed, same metrics", check_same_seed, name, archs[0])
    run("checkpoint resumes bit for bit", check_resume, name, archs[0])
    run("stack", check_stack, name, archs[0])
    failed = [c for c in results if not c.passed]
    if failed and raise_on_failure:
        raise RuleCheckError(
            f"{name}: {len(failed)} of {len(results)} checks failed:\n"
            + "\n".join(f"  {c}" for c in failed)
        )
    return results
