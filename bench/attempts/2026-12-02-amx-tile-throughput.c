#include <stdio.h>
#include <string.h>
#include <stdint.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <immintrin.h>
#include <time.h>
typedef struct __attribute__((aligned(64))) { uint8_t p, s, r[14]; uint16_t c[16]; uint8_t rows[16]; } cfg_t;
static double now(){ struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+t.tv_nsec*1e-9; }
static uint16_t buf[1<<22] __attribute__((aligned(64)));
#define N 200000
__attribute__((target("amx-tile,amx-bf16")))
int main(){
  syscall(SYS_arch_prctl, 0x1023, 18);
  cfg_t c; memset(&c,0,sizeof c); c.p=1; for(int i=0;i<8;i++){c.c[i]=64;c.rows[i]=16;}
  _tile_loadconfig(&c);
  for (int i=0;i<(1<<22);i++) buf[i]=0x3f80;
  _tile_loadd(4,buf,64); _tile_loadd(5,buf,64); _tile_loadd(6,buf,64); _tile_loadd(7,buf,64);
  double t=now();
  for(int i=0;i<N;i++){ _tile_dpbf16ps(0,4,6); _tile_dpbf16ps(1,5,6); _tile_dpbf16ps(2,4,7); _tile_dpbf16ps(3,5,7);}
  double d=now()-t; printf("4 indep: %.2f ns/tdp\n", d/N/4*1e9);
  t=now();
  for(int i=0;i<N;i++){ _tile_dpbf16ps(0,4,6); _tile_dpbf16ps(0,5,6); _tile_dpbf16ps(0,4,7); _tile_dpbf16ps(0,5,7);}
  d=now()-t; printf("1 chain: %.2f ns/tdp\n", d/N/4*1e9);
  t=now();
  for(int i=0;i<N;i++){ _tile_dpbf16ps(0,4,6); _tile_dpbf16ps(1,5,6); _tile_dpbf16ps(0,4,7); _tile_dpbf16ps(1,5,7);}
  d=now()-t; printf("2 chains: %.2f ns/tdp\n", d/N/4*1e9);
  // loads L1 (same 4KB)
  t=now();
  for(int i=0;i<N;i++){ _tile_loadd(4,buf,64); _tile_loadd(6,buf+512,64); _tile_dpbf16ps(0,4,6); _tile_dpbf16ps(1,4,6);_tile_loadd(5,buf+1024,64); _tile_loadd(7,buf+1536,64); _tile_dpbf16ps(2,5,7); _tile_dpbf16ps(3,5,7);}
  d=now()-t; printf("L1 2 loads per 2 tdp: %.2f ns/tdp\n", d/N/4*1e9);
  // loads from L2-sized region: stride through 1MB
  t=now();
  for(int i=0;i<N;i++){ size_t o=(size_t)(i*2048)&((1<<19)-1); _tile_loadd(4,buf+o,64); _tile_loadd(6,buf+o+512,64); _tile_dpbf16ps(0,4,6); _tile_dpbf16ps(1,4,6);_tile_loadd(5,buf+o+1024,64); _tile_loadd(7,buf+o+1536,64); _tile_dpbf16ps(2,5,7); _tile_dpbf16ps(3,5,7);}
  d=now()-t; printf("L2(1MB) 2 loads per 2 tdp: %.2f ns/tdp\n", d/N/4*1e9);
  t=now();
  for(int i=0;i<N;i++){ _tile_loadd(4,buf,64); _tile_loadd(5,buf+512,64); _tile_loadd(6,buf+1024,64); _tile_loadd(7,buf+1536,64); _tile_dpbf16ps(0,4,6); _tile_dpbf16ps(1,5,6); _tile_dpbf16ps(2,4,7); _tile_dpbf16ps(3,5,7);}
  d=now()-t; printf("L1 4 loads per 4 tdp: %.2f ns/tdp\n", d/N/4*1e9);
  _tile_release();
}
