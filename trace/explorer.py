"""A small interactive explorer of a trace, for Jupyter: pick a stage, step, layer and head,
and see that stage's table, heatmap and figure."""
import ipywidgets as widgets
from IPython.display import display

from stages import UserError

from .plots import stage_figure
from .run import Trace
from .tables import stage_detail


def view(trace: Trace, stage: int, step: int, layer: int, head: int, figure: bool) -> list:
    """What the explorer shows for one choice: the stage in detail, and its figure when asked for
    (or one line saying why there is none)."""
    shown: list = [stage_detail(trace, stage, step, layer, head)]
    if figure:
        try:
            shown.append(stage_figure(trace, stage, step, layer, head))
        except UserError as e:  # values not kept for this choice
            shown.append(f"No figure: {e}. Trace with Capture.everything() to explore every step and layer.")
    return shown


def explorer(trace: Trace, stage: int = 13, figure: bool = True) -> widgets.VBox:
    """Controls for stage, step, layer and head above what `view` shows for them."""
    controls = {
        "stage": widgets.Dropdown(options=[(f"{s.number}. {s.short}", s.number) for s in trace.stages], value=stage,
                                  description="stage"),
        "step": widgets.IntSlider(0, 0, max(trace.n_steps - 1, 0), description="step"),
        "layer": widgets.IntSlider(0, 0, trace.config.n_layers - 1, description="layer"),
        "head": widgets.IntSlider(0, 0, trace.config.n_heads - 1, description="head"),
        "figure": widgets.Checkbox(figure, description="figure"),
    }
    out = widgets.Output()

    def update(_=None) -> None:
        with out:
            out.clear_output(wait=True)
            for item in view(trace, **{name: control.value for name, control in controls.items()}):
                display(item)

    for control in controls.values():
        control.observe(update, "value")
    update()
    return widgets.VBox([widgets.HBox([controls["stage"], controls["step"], controls["figure"]]),
                         widgets.HBox([controls["layer"], controls["head"]]), out])
