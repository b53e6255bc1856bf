/*
 * Lower bound for a native collapsed-engine kernel (README, "Benchmarks").
 *
 * The per-group algebra of one value and gradient of the collapsed density at
 * q = 6 coefficients (5 features), written as a plain scalar C loop over
 * 10,000 groups: M = I + inv D S D, its Cholesky factor L, T = L^-1, the
 * solves u = T [DS, Dr], v = T'u, the summed forms, M^-1 = T'T, the
 * cotangent solves T'T C and the gradient's products. (The XLA code does one
 * more forward pass, to keep nothing between its two passes over the groups.)
 * Prints the best of 20 passes, per group.
 *
 *   gcc -O3 -march=native -o /tmp/per_group_c benchmarks/per_group_c.c -lm
 *   /tmp/per_group_c
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define Q 6
#define G 10000
#define ROWS 20

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* out = T x and out = T' x for lower triangular T, x of Q + 1 columns. */
static void tri_mm(const double T[Q][Q], const double x[Q][Q + 1], double out[Q][Q + 1]) {
  for (int i = 0; i < Q; i++)
    for (int n = 0; n <= Q; n++) {
      double s = 0;
      for (int k = 0; k <= i; k++) s += T[i][k] * x[k][n];
      out[i][n] = s;
    }
}

static void tri_tmm(const double T[Q][Q], const double x[Q][Q + 1], double out[Q][Q + 1]) {
  for (int j = 0; j < Q; j++)
    for (int n = 0; n <= Q; n++) {
      double s = 0;
      for (int i = j; i < Q; i++) s += T[i][j] * x[i][n];
      out[j][n] = s;
    }
}

int main(void) {
  double *S = malloc(sizeof(double) * G * Q * Q), *r = malloc(sizeof(double) * G * Q);
  srand(0);
  for (int g = 0; g < G; g++) {
    double X[ROWS][Q];
    for (int n = 0; n < ROWS; n++) {
      X[n][0] = 1;
      for (int j = 1; j < Q; j++) X[n][j] = rand() / (double)RAND_MAX - 0.5;
    }
    for (int i = 0; i < Q; i++) {
      r[g * Q + i] = 0;
      for (int j = 0; j < Q; j++) {
        double s = 0;
        for (int n = 0; n < ROWS; n++) s += X[n][i] * X[n][j];
        S[(g * Q + i) * Q + j] = s;
      }
      for (int n = 0; n < ROWS; n++) r[g * Q + i] += X[n][i] * 0.3;
    }
  }
  const double d[Q] = {0.5, 0.4, 0.3, 0.6, 0.2, 0.7}, inv = 2.0;
  double best = 1e9, check = 0;
  for (int rep = 0; rep < 20; rep++) {
    double t0 = now(), logdet = 0, ss = 0, Y[Q][Q] = {{0}}, z[Q] = {0}, gsum = 0;
    for (int g = 0; g < G; g++) {
      const double *Sg = S + g * Q * Q, *rg = r + g * Q;
      double L[Q][Q], T[Q][Q] = {{0}}, x[Q][Q + 1], u[Q][Q + 1], v[Q][Q + 1];
      double mi[Q][Q], c[Q][Q + 1], w[Q][Q + 1], nn[Q][Q + 1];
      for (int i = 0; i < Q; i++)
        for (int j = 0; j <= i; j++) L[i][j] = (i == j) + inv * d[i] * Sg[i * Q + j] * d[j];
      for (int j = 0; j < Q; j++) {
        double s = L[j][j];
        for (int k = 0; k < j; k++) s -= L[j][k] * L[j][k];
        s = sqrt(s);
        L[j][j] = s;
        logdet += log(s);
        for (int i = j + 1; i < Q; i++) {
          double t = L[i][j];
          for (int k = 0; k < j; k++) t -= L[i][k] * L[j][k];
          L[i][j] = t / s;
        }
      }
      for (int i = 0; i < Q; i++) {
        double iv = 1 / L[i][i];
        for (int j = 0; j < i; j++) {
          double s = 0;
          for (int k = j; k < i; k++) s -= L[i][k] * T[k][j];
          T[i][j] = s * iv;
        }
        T[i][i] = iv;
      }
      for (int i = 0; i < Q; i++) {
        for (int j = 0; j < Q; j++) x[i][j] = d[i] * Sg[i * Q + j];
        x[i][Q] = d[i] * rg[i];
      }
      tri_mm(T, x, u);
      tri_tmm(T, u, v);
      for (int i = 0; i < Q; i++) {
        ss += u[i][Q] * u[i][Q];
        for (int j = 0; j < Q; j++) Y[i][j] += v[i][j] / d[i];
        z[i] += v[i][Q] / d[i];
      }
      for (int j = 0; j < Q; j++)
        for (int k = 0; k <= j; k++) {
          double s = 0;
          for (int i = j; i < Q; i++) s += T[i][j] * T[i][k];
          mi[j][k] = mi[k][j] = s;
        }
      for (int i = 0; i < Q; i++)
        for (int n = 0; n <= Q; n++) c[i][n] = 0.01 * (i + n) / d[i];
      tri_mm(T, c, w);
      tri_tmm(T, w, nn);
      for (int i = 0; i < Q; i++)
        for (int j = 0; j < Q; j++) {
          double s = -0.5 * mi[i][j];
          for (int n = 0; n <= Q; n++) s -= nn[i][n] * v[j][n];
          gsum += s * d[i] * Sg[i * Q + j] * d[j];
        }
    }
    double t = now() - t0;
    if (t < best) best = t;
    check += logdet + ss + Y[1][2] + z[3] + gsum;
  }
  printf("%d groups, q = %d: %.2f ms per value and gradient, %.3f us per group (check %g)\n",
         G, Q, best * 1e3, best * 1e6 / G, check);
  free(S);
  free(r);
  return 0;
}
