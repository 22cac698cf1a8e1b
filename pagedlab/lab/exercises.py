"""Predict-then-check exercises: a question, and its answer (computed by the notebook's code) hidden until the
learner opens it."""
from __future__ import annotations

import ipywidgets as widgets


def exercise(question: str, answer: str) -> widgets.VBox:
    """`question` and `answer` are HTML; the answer stays folded until opened."""
    reveal = widgets.Accordion(children=[widgets.HTML(answer)], titles=("Check: show the answer",),
                               selected_index=None)
    return widgets.VBox([widgets.HTML(f"<b>Predict:</b> {question}"), reveal])
