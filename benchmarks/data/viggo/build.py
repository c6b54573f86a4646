#!/usr/bin/env python3
"""Build a category-split data-to-text set from ViGGO (Juraska et al., 2019).

Source: github.com/jjuraska/slug2slug, data/video_game/{train,valid,test}.csv
(columns mr, ref; one reference per row). The three original splits are pooled and
re-split by *category* = primary genre of the game (most frequent first-listed value
of the `genres[...]` slot over all MRs naming that game). MRs without a game name
(e.g. request(...)) get the first genre of their own genres slot; MRs with neither
are dropped. `--by da` splits by dialogue act instead (writes to <out>/by_da/).

Usage: python3 build.py (--git-dir SLUG2SLUG_GIT_DIR [--commit 3a1629a05ad6204aac07c24c6250b06311bc28b2] | --src-dir DIR)
                        [--out DIR] [--by genre|da]
The files here were built from commit 3a1629a05ad6204aac07c24c6250b06311bc28b2 with the defaults (seed 13).
"""
import argparse, collections, csv, io, os, random, re, subprocess

SEED = 13
SPLITS = ("train", "valid", "test")
MAX_MR_WORDS, MAX_REF_WORDS = 60, 50
TEST_INPUTS = (300, 500)        # distinct test inputs wanted
HELDOUT_ROWS = 300
TRAIN_ROWS_MAX = 3000

def read_source(a):
    rows = []
    for s in SPLITS:
        if a.src_dir:
            text = open(os.path.join(a.src_dir, f"{s}.csv"), encoding="utf-8").read()
        else:
            text = subprocess.run(["git", f"--git-dir={a.git_dir}", "show",
                                   f"{a.commit}:data/video_game/{s}.csv"],
                                  check=True, capture_output=True).stdout.decode("utf-8")
        for r in csv.DictReader(io.StringIO(text)):
            rows.append({"mr": " ".join(r["mr"].split()), "ref": " ".join(r["ref"].split()), "orig_split": s})
    return rows

def slot(mr, name):
    m = re.search(r"(?:\(|, )" + name + r"\[([^\]]*)\]", mr)
    return m.group(1) if m else None

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--git-dir", help="a clone (or bare git directory) of github.com/jjuraska/slug2slug")
    ap.add_argument("--commit", default="HEAD")
    ap.add_argument("--src-dir", default=None)
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--by", choices=["genre", "da"], default="genre")
    a = ap.parse_args()
    out = a.out if a.by == "genre" else os.path.join(a.out, "by_da")
    os.makedirs(out, exist_ok=True)

    rows = read_source(a)
    n_raw = len(rows)
    rows = [r for r in rows if len(r["mr"].split()) < MAX_MR_WORDS and 0 < len(r["ref"].split()) < MAX_REF_WORDS]
    # dedupe identical (mr, ref) pairs
    seen, tmp = set(), []
    for r in rows:
        k = (r["mr"], r["ref"])
        if k not in seen:
            seen.add(k); tmp.append(r)
    rows = tmp
    for r in rows:
        r["da"] = r["mr"].split("(", 1)[0]
        r["entity"] = slot(r["mr"], "name") or ""
        g = slot(r["mr"], "genres")
        r["g1"] = g.split(", ")[0].strip() if g else ""
    # game -> primary genre
    votes = collections.defaultdict(collections.Counter)
    for r in rows:
        if r["entity"] and r["g1"]:
            votes[r["entity"]][r["g1"]] += 1
    game_cat = {gm: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for gm, c in votes.items()}
    for r in rows:
        if a.by == "da":
            r["category"] = r["da"]
        else:
            r["category"] = game_cat.get(r["entity"], "") if r["entity"] else r["g1"]
    rows = [r for r in rows if r["category"]]

    by_mr = collections.OrderedDict()
    for r in rows:
        by_mr.setdefault(r["mr"], []).append(r)
    cat_inputs = collections.Counter(v[0]["category"] for v in by_mr.values())
    cats = sorted(cat_inputs)
    rng = random.Random(SEED)
    # pick ~1/3 of categories for test, total distinct test inputs in TEST_INPUTS
    k = max(1, round(len(cats) / 3))
    for _ in range(100000):
        cand = rng.sample(cats, k)
        n = sum(cat_inputs[c] for c in cand)
        if TEST_INPUTS[0] <= n <= TEST_INPUTS[1]:
            break
    else:
        raise SystemExit("no category subset satisfies the test size")
    test_cats = sorted(cand)
    train_cats = [c for c in cats if c not in test_cats]

    test_mrs = [m for m, v in by_mr.items() if v[0]["category"] in test_cats]
    tr_mrs = [m for m, v in by_mr.items() if v[0]["category"] in train_cats]
    rng.shuffle(tr_mrs)
    held, train = [], []
    nh = nt = 0
    for m in tr_mrs:
        if nh < HELDOUT_ROWS:
            held.append(m); nh += len(by_mr[m])
        elif nt + len(by_mr[m]) <= TRAIN_ROWS_MAX:
            train.append(m); nt += len(by_mr[m])

    cols = ["mr", "ref", "category", "entity"]
    def dump(name, mrs):
        with open(os.path.join(out, name), "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for m in mrs:
                for r in by_mr[m]:
                    w.writerow(r)
        return sum(len(by_mr[m]) for m in mrs)
    stats = {}
    for name, mrs in (("train.csv", train), ("heldout.csv", held), ("test.csv", test_mrs)):
        stats[name] = (dump(name, mrs), len(mrs))
    train_mr_text = " ".join(train)
    test_rows = [r for m in test_mrs for r in by_mr[m]]
    with_ent = [r for r in test_rows if r["entity"]]
    unseen = [r for r in with_ent if r["entity"] not in train_mr_text]
    test_ents = {r["entity"] for r in with_ent}
    unseen_ents = {e for e in test_ents if e not in train_mr_text}

    print(f"source rows {n_raw}, after length filter+dedupe+category {len(rows)}; categories={len(cats)}")
    print("train/heldout categories:", ", ".join(f"{c}({cat_inputs[c]})" for c in train_cats))
    print("test categories:", ", ".join(f"{c}({cat_inputs[c]})" for c in test_cats))
    for n, (nr, ni) in stats.items():
        print(f"{n}: {nr} rows, {ni} distinct inputs")
    print(f"test rows with entity: {len(with_ent)}/{len(test_rows)}; unseen-entity rows: {len(unseen)} "
          f"= {len(unseen)/max(1,len(with_ent)):.1%} of rows with entity, {len(unseen)/len(test_rows):.1%} of all test rows; "
          f"distinct test entities {len(test_ents)}, unseen {len(unseen_ents)}")
    ent_tr = {r['entity'] for m in train for r in by_mr[m] if r['entity']}
    ent_he = {r['entity'] for m in held for r in by_mr[m] if r['entity']}
    print(f"distinct entities: train {len(ent_tr)}, heldout {len(ent_he)} (in train: {len(ent_he & ent_tr)})")

if __name__ == "__main__":
    main()
