"""What the prefill and the decode worker share at run time: process entry (`main`), start-up of
the gRPC server and KV transport (`runtime`), joining the control plane (`agent`) and the engine
thread's inbox and idle self-check (`engine_loop`)."""
