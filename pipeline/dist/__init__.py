"""More than one process: Horovod replicas, TensorFlow clusters, worker tasks on other hosts."""
