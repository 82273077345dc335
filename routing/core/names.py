"""Model names: `llama3` and `llama3:latest` are one model, as Ollama treats them."""


def model_key(name: str) -> str:
    """The canonical spelling used for matching and counting."""
    name = name.strip()
    base = name.rsplit("/", 1)[-1]
    return name if ":" in base else f"{name}:latest"


MAX_NAME = 500


def is_model_name(name: object) -> bool:
    """A spelling every route accepts as a model name (the API routes and /api/stats alike):
    a non-empty str of at most MAX_NAME characters, without control characters, lone
    surrogates (valid in JSON, not storable as UTF-8) or blanks at either end."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= MAX_NAME
        and name == name.strip()
        and not any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in name)
    )


def spellings(name: str) -> list[str]:
    """Every spelling of one model, sorted: its key and, for a `:latest` key, the bare name
    (`llama3` and `llama3:latest`); only spellings whose `model_key` is the same key, so
    `m:latest:latest` is not `m:latest`."""
    key = model_key(name)
    bare = key.removesuffix(":latest")
    return sorted({key, bare}) if bare != key and model_key(bare) == key else [key]


def display_name(name: str) -> str:
    """How a model is listed to clients: as the backend spells it."""
    return name.strip()


def name_list(text: str) -> list[str]:
    """Model names written one per line or comma-separated (an alias's targets, a fallback
    chain), in order, blanks dropped, each kept once by `model_key` (its first spelling)."""
    seen: set[str] = set()
    names: list[str] = []
    for piece in text.replace(",", "\n").splitlines():
        name = piece.strip()
        if name and model_key(name) not in seen:
            seen.add(model_key(name))
            names.append(name)
    return names
