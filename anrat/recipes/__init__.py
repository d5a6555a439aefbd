"""``python -m anrat.recipes.<name>`` runs the end-to-end recipes of the top-level ``recipes/`` folder.

The recipes live in ``recipes/`` (they compose ``anrat`` and ``pruning`` and hold no logic of
their own); this package only points its module search path there, so both
``python -m anrat.recipes.mnist_prune`` and ``python -m recipes.mnist_prune`` run the same file.
"""

import recipes as _recipes

__path__ = list(_recipes.__path__)
