"""Model-card templates of hf-plugin, installed as the package data `hf_plugin.model_cards`."""
