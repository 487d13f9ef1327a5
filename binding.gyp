{
  "targets": [
    {
      "target_name": "nimble_shm",
      "sources": ["native/shm.c"],
      "cflags": ["-O2", "-Wall"],
      "conditions": [["OS!='linux'", {"type": "none", "sources!": ["native/shm.c"]}]]
    }
  ]
}
