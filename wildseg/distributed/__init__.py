"""Running `wildseg segment` and `wildseg eval` on a Ray cluster (`--ray`).

The driver (the command) lists the work as it does on one machine, skips what is done, and hands chunks of
images to Ray actors, one per GPU (or per `cpus_per_worker` CPUs), two chunks in flight per actor so that none
waits between chunks. Each actor loads the model once and runs the single-machine code on its chunks
(`batch.segment_and_write` for segment, `evaluation.evaluate` for eval), so the files it writes to the shared
`--out` are the ones a one-process run writes. Faults: an actor whose process dies is restarted by Ray
(`max_restarts`) and its unfinished chunks are run again, by it or by the others; one whose restart does not come
within a minute (its node is gone and no other has room) or whose restarts are used up is given up and its
chunks go to the others; a chunk run again skips the images whose outputs its first attempt wrote. Ctrl-C
tells every actor to stop after the images it is on, and the driver counts what they finished.

Paths: the driver makes the paths of the options absolute, and the workers take the images' relative paths from
the driver's working folder (`SegmentJob.folder`), as every node is expected to see the files at the same paths;
no process changes its working folder. Ray's own habit of putting the driver's folder on the workers' import
path is turned off by giving the job an empty working_dir (so that a folder named like a package there, a clone
of wildseg say, cannot shadow the installed one).
"""
