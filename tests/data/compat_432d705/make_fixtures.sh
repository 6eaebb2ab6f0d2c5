#!/usr/bin/env bash
# Regenerate the fixtures of tests/test_compat_432d705.py with the code of commit 432d705 (an earlier release of this
# project): a packed, trained finetune bundle zip, a full training checkpoint of the same run, and the list of
# hybridmim_components names the bundles of that commit reference. See README.md beside this script.
#
#   tests/data/compat_432d705/make_fixtures.sh            (from anywhere inside the checkout; about a minute on CPU)
#
# The old code runs from a temporary git worktree through PYTHONPATH, from a working directory outside the checkout,
# so the editable install of today's package cannot win (checked below before anything is run).
set -euo pipefail
COMMIT=432d705
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(git -C "$HERE" rev-parse --show-toplevel)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
BUNDLE=hybridmim_unet_msd_spleen
TMP="$(mktemp -d)"
WT="$TMP/wt$COMMIT"
cleanup() { git -C "$REPO" worktree remove --force "$WT" 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT

git -C "$REPO" worktree add --detach "$WT" "$COMMIT" >/dev/null
cd "$TMP"
export PYTHONPATH="$WT" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONHASHSEED=0
"$PY" -c "import hybridmim_components as h, sys; f = h.__file__; print('hybridmim_components from', f); \
sys.exit(0 if f.startswith('$WT/') else 'not the $COMMIT worktree: ' + f)"

# 1. the names: every hybridmim_components target, expression name and import in the commit's twelve bundles
"$PY" - "$REPO" "$COMMIT" > "$HERE/referenced_names.txt" <<'PYEOF'
import re, subprocess, sys
repo, commit = sys.argv[1], sys.argv[2]
files = subprocess.run(["git", "-C", repo, "ls-tree", "-r", "--name-only", commit, "bundles"],
                       capture_output=True, text=True, check=True).stdout.split()
names = set()
for path in files:
    if path.endswith(".json"):
        text = subprocess.run(["git", "-C", repo, "show", f"{commit}:{path}"], capture_output=True, text=True,
                              check=True).stdout
        names.update(re.findall(r"hybridmim_components(?:\.[A-Za-z_][A-Za-z0-9_]*)*", text))
print(f"# hybridmim_components names referenced (as _target_, in $ expressions or $import) by the JSON configs of the")
print(f"# twelve bundles of commit {commit}; written by make_fixtures.sh. One dotted name per line.")
print("\n".join(sorted(names)))
PYEOF

# 2. tiny demo CT (two classes: spleen) with the commit's own generator
"$PY" "$WT/tools/make_demo_data.py" ct --out_dir "$TMP/data" --num_classes 2 --n_train 1 --n_val 1 --n_test 1 \
    --shape "[40,40,32]"

# 3. train the commit's finetune bundle one epoch, tiny width and crop, from scratch (no pretrained weights)
cp -r "$WT/bundles/$BUNDLE" "$TMP/$BUNDLE"
"$PY" -m monai.bundle run --config_file "$TMP/$BUNDLE/configs/train.json" --bundle_root "$TMP/$BUNDLE" \
    --dataset_dir "$TMP/data" --data_list_file_path dataset.json --pretrained_path "" \
    --features "[2,2,4,4,8,2]" --roi_size "[32,32,32]" --amp false --num_samples 1 --cache_rate 0 \
    --train#dataloader#num_workers 0 --validate#dataloader#num_workers 0 --val_interval 1 \
    --train#trainer#max_epochs 1 > "$TMP/train.log" 2>&1 || { tail -40 "$TMP/train.log"; exit 1; }
ls -l "$TMP/$BUNDLE/models"

# 4. pack it with the commit's own packer, as a user of that release would have shared it
"$PY" "$WT/tools/pack_bundle.py" "$TMP/$BUNDLE" --output "$HERE/${BUNDLE}_432d705.zip"
chmod 644 "$HERE/${BUNDLE}_432d705.zip"  # the packer writes through mkstemp (private)

# 5. the full training checkpoint the run wrote at the end of its epoch (no random_states in that release)
cp "$TMP/$BUNDLE/models/checkpoint_epoch=1.pt" "$HERE/checkpoint_epoch=1.pt"
"$PY" -c "import torch; c = torch.load('$HERE/checkpoint_epoch=1.pt', weights_only=True); \
print('checkpoint keys', sorted(c), 'trainer', dict(c['trainer']))"
du -ch "$HERE"/*.zip "$HERE"/*.pt | tail -1
