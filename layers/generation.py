"""What a layer's model needs to end its turn: its chat template and its stop strings.

The packaged default model (Gemma 3 270M, a base model) has no chat template in its GGUF.
llama-server then falls back to ChatML, whose ``<|im_end|>`` is plain text to Gemma's
tokenizer: the model never ends its turn and writes ``<|im_end|>\\n<|im_start|>…`` until
its slot's context is full (issue 15). For that model the layers use llama.cpp's built-in
``gemma`` template (``<start_of_turn>user … <end_of_turn>``, whose ``<end_of_turn>`` is an
end-of-generation token of Gemma's vocabulary) and stop at any turn marker, Gemma's or
ChatML's, that the model writes as text. A configured GGUF keeps its own template.

Used by the supervisor (engine arguments) and the gateway (stop strings of requests).
"""

from __future__ import annotations

from layers.config import LayerConfig

PACKAGED_MODEL_TEMPLATE = "gemma"
# ``chat_template`` value that means: the GGUF's own template, whatever the model.
MODEL_TEMPLATE = "model"
# Turn markers of Gemma and ChatML. As special tokens they end generation by themselves
# (and are not part of the text); these catch them spelled out as plain text.
TURN_MARKERS = ("<end_of_turn>", "<start_of_turn>", "<|im_end|>", "<|im_start|>")


def serves_packaged_model(layer: LayerConfig) -> bool:
    return layer.model is None


def chat_template(layer: LayerConfig) -> str | None:
    """The built-in template the layer's engine is started with; None: the GGUF's own."""
    chosen = layer.chat_template
    if chosen is None:
        return PACKAGED_MODEL_TEMPLATE if serves_packaged_model(layer) else None
    return None if chosen == MODEL_TEMPLATE else chosen


def template_args(engine_kind: str, layer: LayerConfig) -> list[str]:
    """Engine arguments that select the template.

    llama-server renders ``--chat-template`` as a Jinja template unless ``--no-jinja`` is
    given (Jinja is its default): with Jinja, ``--chat-template gemma`` would be a template
    whose whole output is the word "gemma". Built-in names need the non-Jinja renderer,
    which handles system messages for Gemma (merged into the first user turn) but refuses
    requests with ``tools``. llama-cpp-python calls the same thing ``--chat_format``.
    """
    name = chat_template(layer)
    if name is None:
        return []
    if engine_kind == "llama-cpp-python":
        return ["--chat_format", name]
    return ["--no-jinja", "--chat-template", name]


def stop_strings(layer: LayerConfig) -> list[str]:
    """Stop strings added to the layer's chat and completion requests."""
    if layer.stop is None:
        return list(TURN_MARKERS) if serves_packaged_model(layer) else []
    return list(layer.stop)
