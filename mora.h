/*
 * The MORA loop (DESIGN.md, "The MORA loop"): `train_mora mora` (presample, isolate, rewrite,
 * assimilate, update), `train_mora eval` (the comparison table) and the built-in demo that
 * `train_mora` runs with no arguments. Implemented in mora.c; the demo in demo.c, its synthetic
 * world in demo_world.h.
 */
#ifndef MORA_H
#define MORA_H
int cmd_mora(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_demo(int argc, char **argv);
#endif
