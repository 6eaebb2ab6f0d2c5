"""The paper's experiments, one command each, driving the bundles only through ``python -m monai.bundle run``.

    python -m tools.experiments.label_efficiency --small   # Fig. 4: Dice vs share of labelled cases
    python -m tools.experiments.loss_ablation --small      # Table 4: loss terms switched on cumulatively
    python -m tools.experiments.settings --small           # Fig. 6: mask ratio / region size: Dice and step time

``--small`` is a CPU smoke preset on generated (synthetic) data; without it the bundles' paper-scale defaults run on
``--device cuda`` with ``--dataset_dir``/``--datalist`` (and ``--pool_dir``/``--pool_datalist`` for pretraining)
pointing at your data. Each writes CSV, Markdown and PNG into ``--out_dir`` and resumes an interrupted run.

Modules: :mod:`.runner` (presets, data, runs with resume), :mod:`.tables` (aggregation, CSV, Markdown, plots).
"""
