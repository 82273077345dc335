"""Model names: `llama3` and `llama3:latest` are one model, as Ollama treats them."""


def model_key(name: str) -> str:
    """The canonical spelling used for matching and counting."""
    name = name.strip()
    base = name.rsplit("/", 1)[-1]
    return name if ":" in base else f"{name}:latest"


def display_name(name: str) -> str:
    """How a model is listed to clients: as the backend spells it."""
    return name.strip()
