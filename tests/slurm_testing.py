"""Shared by the start-up and launch-check tests: the SLURM environments of an `srun` step in each launch shape."""

SRUN_2_TASKS = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-002]", "SLURM_NTASKS": "2",
                "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


SLURM_GPU_VARS = ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE",
                  "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_NODEID",
                  "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "JAX_LOCAL_DEVICE_IDS")


# srun shapes on 2 nodes x 8 GPUs: (task variables, GPU variables) -> the GPU ordinals the task must drive.
SHAPES = {
    # --ntasks-per-node=1 --gpus-per-node=8: one process per node drives all 8. JAX's default would be [0].
    "one task per node": ({"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
                           "SLURM_STEP_TASKS_PER_NODE": "1(x2)"},
                          {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "SLURM_GPUS_ON_NODE": "8"},
                          list(range(8))),
    # The same, where the GPU plugin sets only SLURM's own variables.
    "one task per node, no CUDA_VISIBLE_DEVICES": (
        {"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "1",
         "SLURM_STEP_NUM_NODES": "2"}, {"SLURM_STEP_GPUS": "0,1,2,3,4,5,6,7"}, list(range(8))),
    # --ntasks-per-node=8 --gpus-per-node=8, tasks share the node's GPUs: local task 5 drives GPU 5 (JAX's default too).
    "one task per GPU, shared": ({"SLURM_NTASKS": "16", "SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_NODEID": "1",
                                  "SLURM_STEP_TASKS_PER_NODE": "8(x2)"},
                                 {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "SLURM_GPUS_ON_NODE": "8"}, [5]),
    # --gpus-per-task=1 (or --gpu-bind): each task sees only its GPU, as ordinal 0; JAX's default [5] does not exist.
    "one task per GPU, bound": ({"SLURM_NTASKS": "16", "SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_NODEID": "1",
                                 "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}, {"CUDA_VISIBLE_DEVICES": "5"}, [0]),
    # 2 tasks per node with 4 GPUs each.
    "two tasks per node": ({"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
                            "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}, {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"},
                           [4, 5, 6, 7]),
}
