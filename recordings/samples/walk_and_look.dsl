w-48,wd-24,w-24,ik-24,k-12,w-48,jw-48,none-24
