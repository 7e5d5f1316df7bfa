"""Training side of prefixserve: ``train`` (a tenant's prefix/prompt + head on the frozen shared backbone),
``pretrain`` (a task-agnostic prefix by masked-LM), ``experiment table1`` (the paper's comparison).

Modules: :mod:`.config` (the three configs, composed from shared option parts: each default written once,
the CLI generated from them), :mod:`.data` (files -> labelled examples), :mod:`.model` (the trainable wrapper
over ``adapters.encoder.PackedEncoder``), :mod:`.train`, :mod:`.pretrain`, :mod:`.experiment`, :mod:`.cli`.
Torch is imported lazily by the CLI handlers.
"""
