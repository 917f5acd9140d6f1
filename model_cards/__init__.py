"""Model card templates, installed as `hf_relformer.model_cards` (read them with `importlib.resources`).

`relformer.md.jinja` is the one template every card is rendered from (`hf_relformer.hub.card.model_card`); the
`reference/` folder holds the rendered cards of the project's reference runs (`scripts/render_model_cards.py`)."""
