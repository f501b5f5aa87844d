/* The MPI library's own all-reduce for `npm run bench:scaling`: MPI_Allreduce in place (MPI_SUM)
 * of N floats, as beit sums gradients, repeated; rank 0 prints one JSON line.
 *   mpiexec -n 2 allreduce N REPEATS */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  long n = argc > 1 ? atol(argv[1]) : 25L * 1024 * 1024 / 4;
  int repeats = argc > 2 ? atoi(argv[2]) : 20;
  float *values = malloc(n * sizeof(float));
  for (long i = 0; i < n; i++) values[i] = (float)(i % 7);
  for (int i = 0; i < 2; i++) MPI_Allreduce(MPI_IN_PLACE, values, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  MPI_Barrier(MPI_COMM_WORLD);
  double started = MPI_Wtime();
  for (int i = 0; i < repeats; i++) MPI_Allreduce(MPI_IN_PLACE, values, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  double seconds = (MPI_Wtime() - started) / repeats;
  if (rank == 0) printf("{\"bytes\": %ld, \"seconds\": %.9f}\n", n * 4, seconds);
  free(values);
  MPI_Finalize();
  return 0;
}
