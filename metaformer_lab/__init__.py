"""metaformer_lab: run the PoolFormer / MetaFormer ablations from the command line."""

__version__ = "0.1.0"
