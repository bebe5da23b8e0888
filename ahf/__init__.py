"""ahf, ambient human feedback: Reddit threads -> dialog turns, feedback labels and reward models.

The stages are the top-level packages `mining` (ingest, store, trees, turns, crawl), `index` (BM25 +
dense indexes, dialog acts), `feedback` (vote tiers, pairs, reply sentiment, exports) and `training`
(DeepSpeed SFT, reward models, policies, merges). This package holds what they share: the `ahf`
command (`ahf.cli`), typed configs (`ahf.config`, defaults in `ahf.configs`), console output
(`ahf.console`) and the end-to-end demo (`ahf.demo`).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ahf")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
