"""The paper's experiments, one command each, driving the bundles only through ``python -m monai.bundle run``.

    python -m tools.experiments.label_efficiency --small   # Fig. 4: Dice vs share of labelled cases
    python -m tools.experiments.loss_ablation --small      # Table 4: loss terms switched on cumulatively
    python -m tools.experiments.settings --small           # Fig. 6: mask ratio / region size: Dice and step time
    python -m tools.experiments.patient_study              # real patients: leave-one-out, pretrained vs scratch

``--small`` is a CPU smoke preset on generated (synthetic) data; without it the bundles' paper-scale defaults run on
``--device cuda`` with ``--dataset_dir``/``--datalist`` (and ``--pool_dir``/``--pool_datalist`` for pretraining)
pointing at your data. Each writes CSV, Markdown and PNG into ``--out_dir`` and resumes an interrupted run.

The patient study has its own presets (``cpu``, the default: 4 real lung-cancer patients in <= 60 min on 2 cores;
``--small``; ``paper`` with ``--task``/``--pool`` datalists): see :mod:`.patient_study`.

Modules: :mod:`.runner` (presets, data, runs with resume), :mod:`.tables` (aggregation, CSV, Markdown, plots),
:mod:`.folds` (patient-level folds that never leak a test patient), :mod:`.paired_stats` (Dice/HD95, paired
bootstrap).
"""
