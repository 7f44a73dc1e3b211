/*
 * The handlers of stop.h. The handler only records the signal and writes a prepared line with
 * write(2), both async-signal-safe; the training loop does the rest at its next step boundary.
 */
#include "stop.h"
#include "comm.h"
#include "utils.h"

#include <signal.h>
#include <unistd.h>

static volatile sig_atomic_t stop_signal_ = 0;
static const int stop_signals_[] = {SIGTERM, SIGINT, SIGUSR1};
#define N_STOP_SIGNALS ((int)(sizeof stop_signals_ / sizeof stop_signals_[0]))
static char stop_message_[N_STOP_SIGNALS][320];

const char *stop_signal_name(int sig) {
    switch (sig) {
        case SIGTERM: return "SIGTERM";
        case SIGINT: return "SIGINT";
        case SIGUSR1: return "SIGUSR1";
        default: return "a signal";
    }
}

static void on_stop_signal(int sig) {
    if (stop_signal_ == 0) stop_signal_ = sig;
    for (int i = 0; i < N_STOP_SIGNALS; i++)
        if (stop_signals_[i] == sig) {
            const char *m = stop_message_[i];
            size_t n = 0;
            while (m[n]) n++;
            ssize_t w = write(STDERR_FILENO, m, n);
            (void)w;
        }
}

void stop_signals_install(const char *what) {
    int rank = comm_rank();
    for (int i = 0; i < N_STOP_SIGNALS; i++) {
        const char *name = stop_signal_name(stop_signals_[i]);
        // rank 0 says it; the others stay quiet (a batch system signals every task) and rank 0
        // names the stop once the ranks have agreed on it
        if (rank == 0)
            snprintf(stop_message_[i], sizeof stop_message_[i],
                     "\n%s: %s received: finishing this step, then a checkpoint and exit (send %s again to stop at once, "
                     "without a checkpoint)\n", what, name, name);
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_stop_signal;
        sigemptyset(&sa.sa_mask);
        // a second signal finds the default action again and ends the process; system calls
        // the signal interrupts (a read of the data, a write of a checkpoint) are restarted
        sa.sa_flags = SA_RESETHAND | SA_RESTART;
        if (sigaction(stop_signals_[i], &sa, NULL) != 0) fatal("sigaction(%s) failed: %s", name, strerror(errno));
    }
}

int stop_signal_agreed(void) {
    return comm_all_reduce_max_int((int)stop_signal_);
}

int stop_signal_exit_status(int sig) {
    comm_finalize();
    return 128 + sig;
}
