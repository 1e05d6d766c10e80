"""What has each expert of a language model learned? Per MoE layer and expert: the tokens routed to it most often,
and the evaluation tokens it weighs highest, each with its context, as Markdown tables (docs/observatory.md).

Shape legend: B windows, T positions, N = B * T tokens, E experts, V vocabulary; `indices_EN`: each expert's
top tokens (N: indices into the flat tokens).
"""

from __future__ import annotations

import numpy as np
import torch

CONTEXT_BEFORE, CONTEXT_AFTER = 16, 4  # tokens shown around an exemplar
_MARKDOWN_SPECIAL = set("\\`*_|[]<>#~")


@torch.no_grad()
def top_tokens(model: torch.nn.Module, x_BT: torch.Tensor, batch_size: int, per_expert: int = 6
               ) -> list[dict[str, np.ndarray]]:
    """Per MoE layer: indices_EN (into x_BT flattened) and weights_EN of the `per_expert` tokens with the highest
    gate probability for each expert, and counts_EV (tokens routed to each expert as its top-1)."""
    model.eval()
    probs: list[list[torch.Tensor]] = []
    counts: list[torch.Tensor] = []
    vocab = None
    for chunk_WT in torch.split(x_BT, batch_size):
        out = model(chunk_WT)
        vocab = out.log_probs_BC.shape[-1]
        for i, gate in enumerate(out.gates):
            if len(probs) <= i:
                probs.append([])
                counts.append(torch.zeros(gate.num_experts * vocab, dtype=torch.int64))
            probs[i].append(gate.probs_NE.detach().float().cpu())
            counts[i] += torch.bincount((gate.top1_N.cpu() * vocab + chunk_WT.reshape(-1).cpu()),
                                        minlength=counts[i].numel())
    found = []
    for layer_probs, layer_counts in zip(probs, counts):
        probs_NE = torch.cat(layer_probs)
        top = probs_NE.topk(min(per_expert, probs_NE.shape[0]), dim=0)
        found.append({"indices_EN": top.indices.T.numpy(), "weights_EN": top.values.T.numpy(),
                      "counts_EV": layer_counts.view(probs_NE.shape[1], vocab).numpy()})
    return found


def markdown_text(text: str) -> str:
    """Text safe inside a Markdown table cell: specials escaped, line breaks and tabs shown as symbols."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append("⏎")
        elif ch == "\t":
            out.append("⇥")
        elif ch in _MARKDOWN_SPECIAL:
            out.append("\\" + ch)
        elif not ch.isprintable() and ch != " ":
            out.append(repr(ch)[1:-1])
        else:
            out.append(ch)
    return "".join(out)


def token_in_context(ids_N: np.ndarray, index: int, block_size: int, tokenizer) -> str:
    """The token at flat `index` in bold, with up to CONTEXT_BEFORE tokens before it and CONTEXT_AFTER after it,
    inside its own window (windows are not contiguous with each other)."""
    start_of_window = index - index % block_size
    end_of_window = start_of_window + block_size
    before = ids_N[max(start_of_window, index - CONTEXT_BEFORE):index]
    after = ids_N[index + 1:min(end_of_window, index + 1 + CONTEXT_AFTER)]
    token = markdown_text(tokenizer.decode([int(ids_N[index])])) or "∅"
    return f"{markdown_text(tokenizer.decode(before))}**{token}**{markdown_text(tokenizer.decode(after))}"


def exemplar_markdown(x_BT: torch.Tensor, found: list[dict[str, np.ndarray]], tokenizer, most_routed: int = 8,
                      title: str = "") -> str:
    """One section per MoE layer: each expert's load share and most routed tokens, then each expert's
    highest-weighted occurrences with their context."""
    ids_N = x_BT.reshape(-1).cpu().numpy()
    block_size = x_BT.shape[1]
    lines = [f"# {title or 'What each expert has learned: tokens routed to it and its highest-weighted tokens'}", ""]
    for layer, arrays in enumerate(found):
        counts_EV = arrays["counts_EV"]
        total = max(int(counts_EV.sum()), 1)
        per_token_V = np.maximum(counts_EV.sum(0), 1)
        lines += [f"## MoE layer {layer}", "",
                  "| expert | share of tokens (top-1) | most routed tokens (count, share of that token's occurrences) |",
                  "|---|---|---|"]
        for e, row_V in enumerate(counts_EV):
            order = np.argsort(-row_V, kind="stable")[:most_routed]
            tokens = ", ".join(f"⟨{markdown_text(tokenizer.decode([int(v)]))}⟩ ({int(row_V[v])}, "
                               f"{row_V[v] / per_token_V[v]:.0%})" for v in order if row_V[v] > 0)
            lines.append(f"| {e} | {row_V.sum() / total:.3f} | {tokens or '(none)'} |")
        lines += ["", "| expert | gate weight | token in context |", "|---|---|---|"]
        for e, (indices_N, weights_N) in enumerate(zip(arrays["indices_EN"], arrays["weights_EN"])):
            for index, weight in zip(indices_N, weights_N):
                lines.append(f"| {e} | {weight:.3f} | {token_in_context(ids_N, int(index), block_size, tokenizer)} |")
        lines.append("")
    return "\n".join(lines)
