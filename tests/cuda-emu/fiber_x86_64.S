# Fiber context switch for x86-64 System V: save the callee-saved registers on the current
# stack, store the stack pointer, load the other one and restore its registers. A few
# nanoseconds, no system call (glibc's swapcontext makes a sigprocmask syscall per switch). The
# SSE/x87 control words are not switched: every fiber runs with the launching thread's (no
# kernel changes the rounding mode).

    .text
    .globl emu_fiber_switch
    .hidden emu_fiber_switch
    .type emu_fiber_switch, @function
# void emu_fiber_switch(void** save_sp /* rdi */, void* load_sp /* rsi */)
emu_fiber_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_fiber_switch, .-emu_fiber_switch

# First activation of a fiber: emu_fiber_switch "returns" here with the entry function in r13
# and its argument in r12 (see fiber_init in exec.cpp). The entry never returns.
    .globl emu_fiber_start
    .hidden emu_fiber_start
    .type emu_fiber_start, @function
emu_fiber_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size emu_fiber_start, .-emu_fiber_start

    .section .note.GNU-stack,"",@progbits
