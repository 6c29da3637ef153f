"""Run folders: the on-disk record of one training run, and the only place runs are read from.

``io``          crash-safe writes (atomic replace, fsync-ed JSON lines) and ``CorruptRunError``
``checkpoint``  nested training state <-> safetensors (never pickle / ``torch.load``)
``provenance``  versions, device and git state recorded in every summary
``folder``      run names, ``RunFolder`` (config / metrics / summary / checkpoints)
``lock``        ``run.lock``: one process at a time owns a run folder
``pairing``     which run is another run's frozen-blocks baseline (D3)

Import from the submodules (``from creditaudit.runs.folder import RunFolder``): each name means
one thing in one place. Apart from ``pairing`` (which reads the config's field metadata), nothing
here imports the rest of ``creditaudit``.
"""
