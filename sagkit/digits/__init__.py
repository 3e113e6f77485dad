"""The shipped digits models: a class-conditional UNet and a classifier, with their weights."""
