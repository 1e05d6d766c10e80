"""Fidelity to the specialization paper's reference code: a literal model and a side-by-side harness.

literal.py holds the paper's networks written plainly (one nn.Module per expert, a separate gate, the
reference's loss and regularizers, docs/paper-notes.md); transfer.py copies a literal model's weights into raymoe's
stacked model; side_by_side.py trains both from the same weights on the same batches and compares every step.
"""
