"""The shipped digits models: a class-conditional UNet and a classifier, their weights (package
data under ``weights/``), their data (:mod:`.data`), training (``python -m sagkit.digits.train``)
and evaluation (:mod:`.evaluation`)."""
