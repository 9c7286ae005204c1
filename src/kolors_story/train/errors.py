"""The error training stops with when the user has to act (bad config, empty data, nothing to
resume); the message says why and what to do."""


class TrainingError(RuntimeError):
    """Training stopped (non-finite loss, bad config ...); the message says why and what to do."""
