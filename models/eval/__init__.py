"""Model evaluation (`idverify eval`): verification accuracy on LFW View 2, plain or as ID-chip vs live (lfw-ivs).

Protocols
    lfw      both images of a pair go through the *live* tower (as JPEG bytes, full pipeline).
    lfw-ivs  the first image of each pair becomes a simulated ID-chip photo
             (`models.eval.chipsim`, ~1 KB JPEG2000, 102x126, seeded per image) whose *bytes* go
             through the full pipeline (decode -> detect -> align -> id tower); the second image
             goes through the live tower. Chips are cropped with the fixed LFW eye positions by
             default (`--chip-landmarks fixed`), so the chip population does not change when the
             detector does; `--chip-landmarks detect` crops on the detected landmarks instead.

Metrics
    accuracy      the standard 10-fold protocol over the selected folds: for each test fold the
                  threshold that maximises accuracy on the *other selected* folds is applied to
                  it (ties: the middle of the best candidates; candidates are midpoints between
                  consecutive distinct scores). With a single fold there is nothing else to
                  train on, so the threshold is chosen on that fold itself; this is optimistic
                  and the report says so (`threshold_selection: "self"`). With folds 9,10 the
                  threshold for 9 comes from 10 and vice versa. Mean, std and standard error.
    TAR@FAR       genuine = the matched pairs of the selected folds; impostors = by default the
                  *extended* set: every cross-identity pair among the selected folds' images
                  (lfw-ivs: each distinct first-column image's chip on the id side against each
                  distinct second-column image on the live side; lfw: every unordered pair of
                  distinct images, live/live). `--no-extended-impostors` uses only the
                  mismatched pairs of pairs.txt. A pair is accepted when score >= threshold; the
                  threshold for FAR f is the lowest one that accepts at most floor(f * N)
                  impostors. FAR f is "resolvable" when f * N >= 1; below that the row says so.
                  The TAR on the extended genuine set (all same-identity image pairs) is given
                  too.
    FTA           failure to acquire (no face, face too small, undecodable) per side; a pair
                  with an FTA side gets score -inf: never accepted, counted in every
                  denominator, genuine and impostor alike.
    calibration   `calibration_table(impostor_scores)`: rows {"score", "far"} (plus the target
                  and counts) for FAR 1e-1 .. 1e-5 (1-2-5 steps) where resolvable, the format
                  `service.face.decide.Threshold.from_calibration` reads.

Outputs (--out, default reports/<protocol>-folds<...>): report.json (numbers, config, model
version, manifest SHA-256, command line, timestamp, git commit), roc.png, det.png,
pair_scores.csv (one row per pairs.txt line).

Throughput: each (image, side) is analysed once; chips are embedded in batches
(`--batch-size`); per-stage times and images/s are printed and reported.

Modules: `pairs` (pairs.txt), `chipsim` (chip simulator), `embedder` (batch runner over the
service pipeline), `metrics`, `protocols` (`evaluate`), `report` (report.json, CSV, summary),
`plots` (ROC, DET), `docs` (docs/benchmarks.md sections), `cli` (`idverify eval`).
"""

PROTOCOLS = ("lfw", "lfw-ivs")
DEFAULT_FOLDS = {"lfw": "1-10", "lfw-ivs": "9,10"}
