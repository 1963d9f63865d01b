"""Framework integrations, one module per framework, each imported on its own (the core needs only numpy
and torch): ``torchgrab.integrations.huggingface`` (``enable_grab(trainer)``) and
``torchgrab.integrations.lightning`` (``GraBCallback``)."""
