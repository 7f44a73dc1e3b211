/*
 * Stopping a training run from outside: SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 asks pretrain and
 * mora to finish the step they are in, save a checkpoint and exit with status 128 + the signal's
 * number (143, 130, 138), so that `--resume` continues exactly where the run stopped. A second
 * signal of the same kind ends the process at once, as without a handler.
 *
 * Under mpirun or srun a signal may reach some ranks and not others, or reach them at different
 * steps: the ranks agree at each step boundary (stop_signal_agreed, one all-reduce of an int), so
 * they all stop after the same step and the checkpoint is that step's. The batch systems send
 * their warning this way: Slurm's `--signal=USR1@600` to every task of a job step, Open MPI's
 * mpirun forwards SIGUSR1 to its ranks (its own SIGTERM/SIGINT handling kills the ranks a few
 * seconds later, too soon for a checkpoint of a large model).
 */
#ifndef LLMC_STOP_H
#define LLMC_STOP_H

// Installs the handlers. what: the command, for the line rank 0 writes to stderr when a signal
// reaches it.
void stop_signals_install(const char *what);
// Collective, called by every rank at the same point: the signal some rank received (the largest
// number when several), or 0.
int stop_signal_agreed(void);
// "SIGTERM", "SIGINT", "SIGUSR1".
const char *stop_signal_name(int sig);
// The status a run stopped by sig exits with, 128 + sig, after ending the collectives on every
// rank (a non-zero exit would otherwise abort the job as an error does).
int stop_signal_exit_status(int sig);

#endif
