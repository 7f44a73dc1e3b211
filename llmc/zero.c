/*
 * ZeRO-1 AdamW over the ranks (see zero.h).
 */
#include <string.h>
#include "zero.h"
#include "comm.h"
#include "utils.h"

void adamw_shard_init(AdamWShard *shard, Model *model, int rank, int world) {
    memset(shard, 0, sizeof(*shard));
    comm_shard_range(model->num_parameters, rank, world, &shard->lo, &shard->hi);
    size_t n = shard->hi - shard->lo;
    if (model->m != NULL && model->v != NULL) {   // a resumed AdamW state: keep this rank's slice
        shard->m = (float *)mallocCheck((n ? n : 1) * sizeof(float));
        shard->v = (float *)mallocCheck((n ? n : 1) * sizeof(float));
        memcpy(shard->m, model->m + shard->lo, n * sizeof(float));
        memcpy(shard->v, model->v + shard->lo, n * sizeof(float));
    }
    free(model->m);
    free(model->v);
    model->m = model->v = NULL;
}

// model_adamw_update runs on a view of the model whose buffers start at lo and whose tensor
// sizes are the parts of each parameter tensor that fall inside [lo, hi), in buffer order: every
// element gets exactly the arithmetic (and the weight decay of its tensor) it gets in the
// unsharded update. Then the shards are all-gathered.
void adamw_shard_update(Model *model, AdamWShard *shard, float lr, float beta1, float beta2, float eps,
                        float weight_decay, float grad_scale) {
    Model view = *model;
    size_t offset = 0;
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        size_t begin = offset, end = offset + model->param_sizes[t];
        size_t lo = begin > shard->lo ? begin : shard->lo, hi = end < shard->hi ? end : shard->hi;
        view.param_sizes[t] = hi > lo ? hi - lo : 0;
        offset = end;
    }
    view.num_parameters = shard->hi - shard->lo;
    view.params = model->params + shard->lo;
    view.grads = model->grads + shard->lo;
    view.m = shard->m;
    view.v = shard->v;
    model_adamw_update(&view, lr, beta1, beta2, eps, weight_decay, grad_scale);
    shard->m = view.m;   // allocated by the first update
    shard->v = view.v;
    model->opt_step = view.opt_step;
    comm_all_gather_shards(model->params, model->num_parameters);
}

// Every rank sends its slice; only root allocates the whole buffers.
void adamw_shard_gather(const AdamWShard *shard, Model *model, int root) {
    if (shard->m == NULL || shard->v == NULL) fatal("adamw_shard_gather: no AdamW state yet (no update has run)");
    int is_root = comm_rank() == root;
    size_t n = model->num_parameters;
    float *m = is_root ? (float *)mallocCheck(n * sizeof(float)) : NULL;
    float *v = is_root ? (float *)mallocCheck(n * sizeof(float)) : NULL;
    comm_gather_shards(m, shard->m, n, root);
    comm_gather_shards(v, shard->v, n, root);
    model->m = m;
    model->v = v;
}

void adamw_shard_release(Model *model) {
    free(model->m);
    free(model->v);
    model->m = model->v = NULL;
}

void adamw_shard_free(AdamWShard *shard) {
    free(shard->m);
    free(shard->v);
    memset(shard, 0, sizeof(*shard));
}
