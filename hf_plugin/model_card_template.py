"""The model-card template of a reweighter (Jinja, rendered by `hf_plugin.hub.render_model_card`).

A Python module rather than a data file, so that the remote-code copy of the modeling code (see
`hf_plugin.hub.write_remote_code`) carries it and can save a reweighter without hf-plugin installed.
"""

REWEIGHTER_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A **reweighter** for {{ base_model_link }}, made with hf-plugin. It is a small autoregressive model whose next-token
distribution multiplies the frozen base model's, following Hiranandani et al., *Logits are All We Need to Adapt
Closed Models* (ICML 2025):

    p(y_t | context) ∝ p_base(y_t | context) · r(y_t | context)^α,   α = {{ alpha }}

The base model is only read through its next-token logits; its weights are never changed.

## What it was trained against

| | |
| --- | --- |
| base model | `{{ base_model }}` |
| base model file | {{ base_model_file }} |
| base model revision | {{ base_model_revision }} |
| base vocabulary width | {{ base_vocab_size }} |
| tokenizer fingerprint | `{{ tokenizer_fingerprint }}` |
| tokenizer size | {{ tokenizer_vocab_size }} |

Attaching it to logits of another width, or to a tokenizer with another fingerprint, raises an error unless
overridden with `strict=False`.

## Architecture

{{ architecture }}: {{ num_hidden_layers }} layer(s), hidden size {{ hidden_size }}, {{ num_attention_heads }}
attention head(s), MLP {{ intermediate_size }}, at most {{ max_position_embeddings }} positions —
{{ num_parameters }} parameters.

## Training

{{ training_section }}

## Validation

{{ validation_section }}

## Evaluation

{{ evaluation_section }}

## Usage

```python
{{ base_loading }}
plugin = PluginModel.from_pretrained("{{ repo_id }}")

inputs = tokenizer(["Your prompt"], return_tensors="pt", padding=True)
processor = PluginLogitsProcessor(plugin, tokenizer=tokenizer, base_model=base)  # alpha=... to change the strength
out = base.generate(**inputs, logits_processor=[processor], max_new_tokens=64)
print(tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

`alpha=0` gives the base model alone, `alpha=1` the trained product, larger values a sharper reweighting.
"""
