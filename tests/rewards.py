"""Programmatic rewards for the `function` ranker in tests (importable by stage subprocesses)."""

TARGET_LETTER = "s"


def starts_with_s(prompt: str, response: str) -> float:
    """Fraction of words starting with 's': a smooth signal a tiny random model can climb."""
    words = response.lower().split()
    return sum(w.startswith(TARGET_LETTER) for w in words) / len(words) if words else 0.0


def not_a_number(prompt: str, response: str) -> str:
    return "high"
