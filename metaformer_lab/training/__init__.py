"""The training loop's parts: the LightningModule, batch mixing, callbacks and log routing (`metaformer_lab.train`
puts them together into a run)."""
