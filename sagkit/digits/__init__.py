"""The shipped digits models: a class-conditional UNet and a classifier, their weights (package
data under ``weights/``), their data (:mod:`.data`), training (``sagkit train``)
and evaluation (:mod:`.evaluation`)."""
