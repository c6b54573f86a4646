"""The Jinja template of a reweighter's model card, rendered by `hf_plugin.hub.render_model_card`.

Its source is `model_cards/reweighter.md`, installed as the package data `hf_plugin.model_cards`. A remote-code
copy of the modeling code carries only Python modules (transformers copies the modules a model imports, no data
files), so `hf_plugin.hub.write_remote_code` writes this module there with the template inlined: the copy can
then save a reweighter, card included, without hf-plugin installed.
"""

import importlib.resources


REWEIGHTER_CARD_TEMPLATE = (
    importlib.resources.files("hf_plugin.model_cards").joinpath("reweighter.md").read_text(encoding="utf-8")
)
