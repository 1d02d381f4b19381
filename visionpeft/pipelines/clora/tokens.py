"""Concept words -> token positions in each branch's prompt, read from the pipeline's own
tokenizer, so that nobody counts token indices by hand (the official notebook's
hand-written indices are off by one)."""
from __future__ import annotations


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special, truncation=special,
                     max_length=tokenizer.model_max_length if special else None).input_ids


def prompt_tokens(tokenizer, prompt: str) -> list[str]:
    """The prompt's tokens as the text encoder sees them (start and end tokens included),
    for error messages and pictures."""
    return tokenizer.convert_ids_to_tokens(_ids(tokenizer, prompt, True))


def find_word(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions of every token of every occurrence of ``word`` (one or more words, which
    may split into several tokens each) in the tokenized ``prompt``; [] when absent or cut
    off by the tokenizer's length limit."""
    ids = _ids(tokenizer, prompt, True)
    sub = _ids(tokenizer, word, False)
    if not sub:
        return []
    toks = tokenizer.convert_ids_to_tokens(ids)
    special = set(tokenizer.all_special_tokens)
    found = []
    for i in range(len(ids) - len(sub) + 1):
        # whole words only: the match starts where a word starts (after the start token or a
        # token that ends a word), so "dog" is not found in "hotdog"
        starts_word = i == 0 or toks[i - 1] in special or toks[i - 1].endswith("</w>")
        if starts_word and ids[i:i + len(sub)] == sub:
            found += range(i, i + len(sub))
    return sorted(set(found))


def concept_tokens(tokenizer, prompt: str, words: list[str]) -> list[int]:
    """Token positions of a concept in a prompt that is not its own (the base prompt,
    another concept's): each word where it occurs whole, else its longest run of trailing
    words that does ("sks dog" is "dog" in "a dog and a cat")."""
    out: set[int] = set()
    for word in words:
        parts = word.split()
        for start in range(len(parts)):
            hit = find_word(tokenizer, prompt, " ".join(parts[start:]))
            if hit:
                out.update(hit)
                break
    return sorted(out)


def describe(tokenizer, prompt: str) -> str:
    toks = [t.replace("</w>", "") for t in prompt_tokens(tokenizer, prompt)[1:-1]]
    return " ".join(f"{i + 1}:{t}" for i, t in enumerate(toks))
