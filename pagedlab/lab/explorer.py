"""The base of the notebooks' explorers: a few ipywidgets controls right above one figure, redrawn when one
moves.

`explorer.redraw(block_size=32)` sets controls and returns the new figure, so a benchmark (or a test) drives an
explorer as a learner's slider does. The figure is shown as a PNG in an `ipywidgets.Image` (class
`pagedlab-main-figure`); the control a learner moves first has the class `pagedlab-main-control`.
"""
from __future__ import annotations

import html
import time

import ipywidgets as widgets
from matplotlib.figure import Figure

from pagedlab.config import ConfigError
from pagedlab.lab.views import figure_png

STYLE = {"description_width": "initial"}


def slider_layout(width: str = "330px") -> widgets.Layout:
    return widgets.Layout(width=width)


class Explorer:
    """Subclasses set `main_control`, build `self.controls` (name -> widget) and implement `draw(**values)`."""

    main_control = ""
    crop: bool | None = None        # trim the PNG's margins (an extra rendering pass); None: figure_png decides

    def __init__(self, controls: dict[str, widgets.Widget], extra: list[widgets.Widget] = ()) -> None:
        self.controls = controls
        self.image = widgets.Image(format="png").add_class("pagedlab-main-figure")
        self.image.layout = widgets.Layout(max_width="100%", height="auto")
        self.status = widgets.HTML()
        self.figure: Figure | None = None
        self.seconds = 0.0          # how long the last redraw took, drawing and PNG included
        self._quiet = False
        controls[self.main_control].add_class("pagedlab-main-control")
        for control in controls.values():
            control.observe(self._changed, names="value")
        # The controls wrap in rows above the figure, which keeps the notebook's full width: the figures are wide.
        bar = widgets.HBox([*controls.values(), *extra],
                           layout=widgets.Layout(flex_flow="row wrap", align_items="center", grid_gap="4px 18px"))
        self.widget = widgets.VBox([bar, self.status, self.image])

    def values(self) -> dict:
        return {name: control.value for name, control in self.controls.items()}

    def set_quietly(self, **values) -> None:
        """Move controls without redrawing (an explorer adjusting its own ranges)."""
        self._quiet = True
        try:
            for name, value in values.items():
                self.controls[name].value = value
        finally:
            self._quiet = False

    def _changed(self, change) -> None:
        if not self._quiet:
            self.redraw()

    def redraw(self, **values) -> Figure | None:
        """Set the given controls, redraw, show and return the figure (None, with the reason shown, when the
        settings are refused: say a max_model_len the cache cannot hold)."""
        unknown = set(values) - set(self.controls)
        if unknown:
            raise ValueError(f"unknown controls {sorted(unknown)}; this explorer has {sorted(self.controls)}")
        self.set_quietly(**values)
        started = time.perf_counter()
        try:
            figure, note = self.draw(**self.values())
        except ConfigError as exc:
            self.status.value = f"<span style='color:#b71c1c'>{html.escape(str(exc))}</span>"
            return None
        self.figure = figure
        self.image.value = figure_png(figure, self.crop)
        self.seconds = time.perf_counter() - started
        self.status.value = f"{note}<br><small>redrawn in {self.seconds:.2f} s</small>"
        return figure

    def draw(self, **values) -> tuple[Figure, str]:
        raise NotImplementedError

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def exercise(question: str, answer: str) -> widgets.VBox:
    """A predict-then-check exercise: the question, and the answer (computed by the notebook) folded away until
    the learner opens it."""
    fold = widgets.Accordion(children=[widgets.HTML(answer)], titles=("Show the answer",), selected_index=None)
    return widgets.VBox([widgets.HTML(f"<b>Predict:</b> {question}"), fold])
