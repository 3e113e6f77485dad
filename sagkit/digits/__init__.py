"""The shipped digits models: a class-conditional UNet and a classifier, their weights (package
data under ``weights/``), their data (:mod:`.data`), training (``sagkit train``)
and evaluation (:mod:`.evaluation`).

    import sagkit as sk
    model = sk.digits.load_pretrained("digits")
"""

from .classifier import DigitsClassifier
from .data import digits_dataset, digits_mixture
from .models import DigitsModel, load_classifier, load_pretrained, sample_digits

__all__ = [
    "DigitsModel",
    "DigitsClassifier",
    "load_pretrained",
    "load_classifier",
    "digits_dataset",
    "digits_mixture",
    "sample_digits",
]
