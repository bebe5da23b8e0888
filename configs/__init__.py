"""The default configs: YAML per stage, DeepSpeed JSON. Installed as the package `ahf.configs` (see ahf.config)."""
