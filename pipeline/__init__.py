"""featcache shared machinery: settings, backbones, datasets, taps, the feature store and the CLI."""

__version__ = "0.1.0"
