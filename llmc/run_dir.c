/*
 * Run-directory helpers (run_dir.h).
 */
#include <sys/stat.h>
#include <fcntl.h>
#include <unistd.h>
#include <glob.h>
#include "run_dir.h"
#include "utils.h"
#include "comm.h"
#include "reward_heads.h"

void run_ensure_dir(const char *path, const char *flag) {
    if (path[0] == '\0') fatal("%s is empty (expected a directory)", flag);
    // mkdir -p: every missing directory of the path, from the top down, so that --out runs/a/b
    // works in a fresh checkout; the message names the part that failed
    size_t len = strlen(path);
    char *part = (char *)mallocCheck(len + 1);
    for (size_t end = 1; end <= len; end++) {
        if (end < len && path[end] != '/') continue;
        if (path[end - 1] == '/') continue;     // "//" or a trailing "/": the part is done already
        memcpy(part, path, end);
        part[end] = '\0';
        struct stat st;
        if (stat(part, &st) == 0) {
            if (!S_ISDIR(st.st_mode)) {
                if (end == len) fatal("%s %s exists and is not a directory", flag, path);
                fatal("%s %s: %s exists and is not a directory", flag, path, part);
            }
        } else if (errno != ENOENT) {
            fatal("%s %s: cannot use %s: %s", flag, path, part, strerror(errno));
        } else if (mkdir(part, 0755) != 0 && errno != EEXIST) {
            // EEXIST: another rank or process made it in the meantime
            fatal("%s %s: cannot create directory %s: %s", flag, path, part, strerror(errno));
        }
    }
    free(part);
    // a directory the run cannot write in (its permissions, a read-only file system) stops the
    // run now rather than at its first checkpoint or report, hours later
    char probe[4400];
    if (strlen(path) + 40 > sizeof probe) fatal("%s: path too long: %s", flag, path);
    snprintf(probe, sizeof probe, "%s/.train_mora_write_check.%ld", path, (long)getpid());
    int fd = open(probe, O_WRONLY | O_CREAT | O_EXCL, 0644);
    if (fd < 0) fatal("%s: cannot write in directory %s: %s", flag, path, strerror(errno));
    close(fd);
    unlink(probe);
}

int run_file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

int run_is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

void run_write_text(const char *path, const char *text) {
    char tmp[4400];
    if (strlen(path) + 32 > sizeof tmp) fatal("path too long: %s", path);
    FILE *f = atomic_open(path, tmp, sizeof tmp);
    fwrite_check(text, 1, strlen(text), f, path);
    atomic_commit(f, tmp, path);
}

void run_write_json(const char *path, const cJSON *obj) {
    char *text = cJSON_Print(obj);
    if (text == NULL) fatal("out of memory formatting %s", path);
    size_t n = strlen(text);
    text = (char *)reallocCheck(text, n + 2);
    text[n] = '\n';
    text[n + 1] = '\0';
    run_write_text(path, text);
    free(text);
}

cJSON *run_read_json(const char *path) {
    char *text = read_file_all(path, NULL);
    cJSON *obj = cJSON_Parse(text);
    if (obj == NULL) fatal("%s: not valid JSON", path);
    free(text);
    return obj;
}

char *run_latest_checkpoint(const char *out) {
    char path[4200];
    snprintf(path, sizeof path, "%s/latest.txt", out);
    if (!run_file_exists(path)) return NULL;
    char *name = read_file_all(path, NULL);
    name[strcspn(name, "\r\n")] = '\0';
    if (name[0] == '\0') fatal("%s: empty (expected a checkpoint file name)", path);
    char *full = (char *)mallocCheck(strlen(out) + strlen(name) + 2);
    sprintf(full, "%s/%s", out, name);
    free(name);
    if (!run_file_exists(full)) fatal("%s names %s, which does not exist", path, full);
    return full;
}

void run_save_checkpoint(const Model *model, const TrainState *state, const char *out) {
    char name[64], path[4200], latest[4200];
    snprintf(name, sizeof name, "model_step%06d.ckpt", state->step);
    snprintf(path, sizeof path, "%s/%s", out, name);
    checkpoint_save_native(model, state, path, 1);
    snprintf(latest, sizeof latest, "%s/latest.txt", out);
    char line[80];
    snprintf(line, sizeof line, "%s\n", name);
    run_write_text(latest, line);
}

FILE *run_open_jsonl_upto(const char *path, const char *key, int last) {
    if (run_file_exists(path)) {
        char tmp[4400];
        char *text = read_file_all(path, NULL);
        FILE *f = atomic_open(path, tmp, sizeof tmp);
        int dropped = 0;
        char *save = NULL;
        for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
            // every line is written whole as one JSON object: anything else is the torn end of
            // a run killed while it wrote, which a later reader of the file would stop at
            cJSON *obj = cJSON_ParseWithOpts(line, NULL, 1);
            if (!cJSON_IsObject(obj)) {
                dropped++;
                cJSON_Delete(obj);
                continue;
            }
            cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
            if (!cJSON_IsNumber(v) || v->valueint <= last) fprintf(f, "%s\n", line);
            cJSON_Delete(obj);
        }
        atomic_commit(f, tmp, path);
        free(text);
        if (dropped > 0)
            printf("%s: dropped %d line(s) that are not whole JSON objects (an incomplete write when the run stopped)\n",
                   path, dropped);
    }
    FILE *f = fopen(path, "ab");
    if (f == NULL) fatal("cannot open %s for appending: %s", path, strerror(errno));
    return f;
}

int run_world_size(const char *out) {
    char path[4200];
    snprintf(path, sizeof path, "%s/config.json", out);
    if (!run_file_exists(path)) return 1;
    cJSON *cfg = run_read_json(path);
    cJSON *w = cJSON_GetObjectItemCaseSensitive(cfg, "world_size");
    int world = 1;
    if (w != NULL) {
        if (!cJSON_IsNumber(w) || w->valueint < 1) fatal("%s: field \"world_size\" must be a positive integer", path);
        world = w->valueint;
    }
    cJSON_Delete(cfg);
    return world;
}

void run_require_world_size(const char *out, const char *flag) {
    // rank 0 reads, so every rank compares against the same number even where the other ranks
    // could not read the file (or read it while rank 0 rewrites it)
    int world = comm_world();
    int run_world = comm_rank() == 0 ? run_world_size(out) : 0;
    comm_broadcast(&run_world, sizeof run_world, 0);
    if (run_world != world)
        fatal("%s: the run in %s was trained with %d rank(s), this launch has %d; resume with the same number of ranks (mpirun -np %d)",
              flag, out, run_world, world, run_world);
}

void run_format_duration(double seconds, char *buf, size_t n) {
    if (!(seconds >= 0) || seconds > 1e8) { snprintf(buf, n, "?"); return; }
    int s = (int)(seconds + 0.5);
    if (s >= 3600) snprintf(buf, n, "%dh%02dm", s / 3600, (s % 3600) / 60);
    else if (s >= 60) snprintf(buf, n, "%dm%02ds", s / 60, s % 60);
    else snprintf(buf, n, "%ds", s);
}

void run_require_new(const char *out, const char *command) {
    // what a run of any command leaves: pretrain's and mora's config.json and checkpoints, the
    // metrics.jsonl of those and of reward
    const char *files[3] = {"config.json", "latest.txt", "metrics.jsonl"};
    for (int i = 0; i < 3; i++) {
        char path[4200];
        snprintf(path, sizeof path, "%s/%s", out, files[i]);
        if (run_file_exists(path))
            fatal("--out %s already holds a run (%s): pass --resume to continue %s %s run there, or choose another "
                  "--out (a new run would mix with the old one's files)", out, path,
                  strchr("aeiosu", command[0]) ? "an" : "a", command);
    }
}

char *run_absolute_path(const char *path) {
    char *resolved = realpath(path, NULL);
    return resolved ? resolved : xstrdup(path);
}

void run_record_model_text(cJSON *cfg, const CheckpointInfo *info) {
    char *tokenizer = info->tokenizer_path[0] ? run_absolute_path(info->tokenizer_path) : xstrdup("");
    cJSON_AddStringToObject(cfg, CKPT_RUN_TOKENIZER_KEY, tokenizer);
    cJSON_AddStringToObject(cfg, CKPT_RUN_CHAT_TEMPLATE_KEY, info->chat_template);
    free(tokenizer);
}

uint64_t run_hash(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = (const unsigned char *)p;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 1099511628211ull;
    }
    return h;
}

void run_require_same_on_ranks(uint64_t fingerprint, const char *what) {
    if (comm_world() == 1) return;
    uint64_t root = fingerprint;
    comm_broadcast(&root, sizeof root, 0);
    int differs = root != fingerprint;
    // an all-reduce, which no rank leaves before all have entered (a broadcast's root may)
    int any = comm_all_reduce_max_int(differs);
    if (differs)
        fatal("%s is not what rank 0 read (fingerprint %016llx, rank 0's %016llx): every rank must read the same "
              "files; on several nodes, put them on a file system all nodes see", what,
              (unsigned long long)fingerprint, (unsigned long long)root);
    // the others wait for the job to end: the ranks above abort it once they have said why
    if (any) comm_barrier();
}

uint64_t run_state_fingerprint(const Model *model, const TrainState *state) {
    size_t n = model->num_parameters;
    uint64_t f[4] = {params_fingerprint(model->params, n), model->m ? params_fingerprint(model->m, n) : 0,
                     model->v ? params_fingerprint(model->v, n) : 0, (uint64_t)state->step};
    return run_hash(RUN_HASH_START, f, sizeof f);
}

int run_has_checkpoints(const char *out) {
    char pattern[4200];
    snprintf(pattern, sizeof pattern, "%s/model_step*.ckpt", out);
    glob_t g;
    int found = glob(pattern, 0, NULL, &g) == 0 && g.gl_pathc > 0;
    globfree(&g);
    return found;
}

const char *run_launch_prefix(void) {
    static char prefix[64];
    int world = comm_world();
    if (world == 1) return "";
    snprintf(prefix, sizeof prefix, comm_started_by_srun() ? "srun -n %d " : "mpirun -np %d ", world);
    return prefix;
}
