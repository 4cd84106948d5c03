"""Making models fit: structured and unstructured pruning, knowledge distillation (Keras 3).

Imports keras/tensorflow inside functions, like edgekit.convert.
"""
