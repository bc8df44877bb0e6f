"""The protocol's tokens in a model whose vocabulary lacks them (any Hugging Face causal LM).

The delayed protocol needs the execute token E as one token: it is a stop token of generation
and the token whose probability the IH surrogate reads. Qwen3 has it (``<tool_call>``); most
other vocabularies split it into pieces. :func:`add_protocol_tokens` then adds E and
``</tool_call>`` (which closes every observation) as special tokens at the end of the vocabulary
and grows the model to match:

* the input embedding of a new token is the mean of the embeddings of the pieces its text had
  before (the model first reads ``<tool_call>`` about as it read the text ``<tool_call>``);
* an untied output row is the mean output row, so the new token starts with an ordinary logit
  instead of a random one (Hewitt, "Initializing new word embeddings", 2021); a tied model's
  one row is the pieces' mean;
* rows that already existed are left untouched, and no random numbers are drawn.

Training saves the tokenizer with every checkpoint, so evaluation and resume see the same ids.
The coupled protocol needs no E and never calls this.
"""

from __future__ import annotations

import logging

from ihgrpo.protocol import EXECUTE_TOKEN

__all__ = ["OBSERVATION_END", "single_token_id", "add_protocol_tokens"]

log = logging.getLogger(__name__)

OBSERVATION_END = "</tool_call>"  # the end of every observation (protocol.OBSERVATION_SUFFIX)


def single_token_id(tokenizer, text: str) -> int | None:
    """The id of ``text`` when the tokenizer encodes it as exactly one known token, else None."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    return ids[0] if len(ids) == 1 and (unk is None or ids[0] != unk) else None


def add_protocol_tokens(model, tokenizer, execute_token: str = EXECUTE_TOKEN) -> list[str]:
    """Adds ``execute_token`` and ``</tool_call>`` where the tokenizer lacks them, in place, and
    resizes and initialises the model's embeddings; returns the tokens added (warns when any)."""
    import torch
    from tokenizers import AddedToken

    missing = [t for t in dict.fromkeys((execute_token, OBSERVATION_END)) if single_token_id(tokenizer, t) is None]
    if not missing:
        return []
    pieces = {t: tokenizer.encode(t, add_special_tokens=False) for t in missing}
    known = len(tokenizer)  # rows past it (padding some models carry) were never trained
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False,
                                     single_word=False) for t in missing], special_tokens=True)
    ids = [single_token_id(tokenizer, t) for t in missing]
    if any(i is None for i in ids):  # pragma: no cover - a tokenizer that ignores added tokens
        raise ValueError(f"the tokenizer did not take {missing} as single tokens")
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is None or head.weight.data_ptr() == emb.weight.data_ptr()
    with torch.no_grad():
        rows = emb.weight.shape[0]
        valid = min(known, rows)
        head_mean = None if tied else head.weight[:valid].float().mean(0)
        bias_mean = None if tied or getattr(head, "bias", None) is None else head.bias[:valid].float().mean()
        piece_means = [emb.weight[[p for p in pieces[t] if p < valid]].float().mean(0)
                       if any(p < valid for p in pieces[t]) else emb.weight[:valid].float().mean(0) for t in missing]
        if max(ids) >= rows:
            with torch.random.fork_rng(devices=[]):  # the rows are set below: draw no random numbers
                model.resize_token_embeddings(max(len(tokenizer), max(ids) + 1), mean_resizing=False)
            emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        for i, mean in zip(ids, piece_means):
            emb.weight[i] = mean.to(emb.weight.dtype)
            if not tied:
                head.weight[i] = head_mean.to(head.weight.dtype)
                if bias_mean is not None:
                    head.bias[i] = bias_mean.to(head.bias.dtype)
    log.warning("the tokenizer had no %s token: added %s as id%s %s (input rows: the mean of the text's "
                "pieces; output rows: the mean row). The model was not trained with %s; checkpoints save the "
                "tokenizer with the new ids", " or ".join(missing), ", ".join(missing), "s" if len(ids) > 1 else "",
                ", ".join(map(str, ids)), "them" if len(ids) > 1 else "it")
    return missing
