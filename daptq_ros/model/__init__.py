"""The reference VLA policy and everything around it.

Modules (imported lazily by their users; nothing heavy is imported here):

- ``config``: :class:`VLAConfig` (architecture) and :class:`TrainConfig` (training recipe).
- ``vla``: :class:`ReferenceVLA` — conv stem + MiniLM token features + proprio → pre-LN
  transformer trunk → ``vl_action_interface`` → DiT flow-matching head or chunked regression head.
- ``language``: :class:`InstructionEncoder` (frozen MiniLM), :class:`InstructionCache`
  (``instructions.safetensors``), ``python -m daptq_ros.model.language --out FILE``.
- ``io``: :func:`save_checkpoint` / :func:`load_checkpoint`, :class:`NormStats`.
- ``data``: :class:`DemoDataset`, :func:`calibration_batches`.
- ``train`` / ``train_cli``: ``daptq train``.
- ``torch_policy``: :class:`TorchPolicy` (StepPolicy over an FP or quantized checkpoint).
- ``adapter``: :class:`ReferenceVLAAdapter` (the quantizer's view of the model).
- ``testing``: tiny synthetic demos, caches and checkpoints for tests.
"""
