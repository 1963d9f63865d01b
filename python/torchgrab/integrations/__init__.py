"""Framework integrations, one module per framework, each imported on its own so that the core needs only
numpy and torch: ``torchgrab.integrations.huggingface`` (``enable_grab(trainer)``) and
``torchgrab.integrations.lightning`` (``GraBCallback``). ``RankShard`` deals the batches of one shared
``GraBSampler`` to the ranks (see ``GraBSampler.watch(..., all_ranks=True)``)."""

from torchgrab.integrations._ranks import RankShard

__all__ = ["RankShard"]
