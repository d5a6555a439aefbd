"""End-to-end recipes: thin scripts that compose ``anrat`` (training) and ``pruning``.

Run them as ``python -m anrat.recipes.<name>``: ``mnist_prune`` (train, prune, export MNIST) and
``function_fit`` (NRAE/ANRAT against MSE on regression problems with known global minima).
"""
