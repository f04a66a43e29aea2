#!/usr/bin/env bash
# The Omniglot and pretrained-CUB recipes chosen by mltk tune on their training classes only, then trained with three
# seeds and scored once on the test classes (docs/results.md, "Recipes chosen on held-out training classes").
#   pip install ./plugins/mltk-efficientnet-lite ./plugins/mltk-gem     # CUB's backbone and pooling
#   bash benchmarks/tune_recipes.sh [omniglot|cub ...]                 # both by default; runs/tune_<name>/
# Budget on 2 CPU cores: a search of 6 trials (2 class-disjoint folds each, Omniglot's folds at 8 epochs, CUB's at
# the recipe's 6) and a final step of 3 seeds at the recipe's epochs (15 and 6). CUB takes about 31 minutes; Omniglot
# about 30 minutes of search and 30 of final step on an idle machine (docs/results.md's run stopped its search after
# 4 trials, for time, with Ctrl-C: `mltk tune runs/tune_omniglot --resume` goes on with it).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
HERE=benchmarks/tune

omniglot() {
    mltk tune runs/tune_omniglot --config $HERE/omniglot_base.yaml --space $HERE/omniglot_space.yaml \
        --data $DATA/omniglot_background_small --folds 2 --trials 6 --epochs 8
    mltk tune runs/tune_omniglot --final --epochs 15 --seeds 3 --test $DATA/omniglot_background_small \
        --test-classes 'Japanese_(katakana)__*' --test-classes 'Sanskrit__*' --test-classes 'Tagalog__*'
}

cub() {
    mltk tune runs/tune_cub --config $HERE/cub_base.yaml --space $HERE/cub_space.yaml \
        --data $DATA/cub200_2011_subset --classes '00?.*' --classes '01?.*' --classes '02[0-5].*' --folds 2 --trials 6
    mltk tune runs/tune_cub --final --seeds 3 --test $DATA/cub200_2011_subset \
        --test-classes '02[6-9].*' --test-classes '03?.*' --test-classes '04?.*' --test-classes '050.*'
}

for name in ${@:-cub omniglot}; do
    case $name in omniglot|cub) "$name" ;; *) echo "unknown recipe '$name'; give omniglot or cub" >&2; exit 2 ;; esac
done
